"""The package's house rules, checked on the source: imports run one way, and `import inferforge` stays
cheap."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import inferforge

PACKAGE = Path(inferforge.__file__).parent
ORDER = [
    "versions",
    "signature",
    "errors",
    "models",
    "techniques",
    "quality",
    "bench",
    "tune",
    "registry",
    "llm",
    "serve",
    "monitor",
    "cli",
]
WEB = ("fastapi", "starlette", "uvicorn", "httpx", "aiohttp", "flask")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _stage(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def test_stages_import_only_stages_to_their_left() -> None:
    violations = []
    for path in PACKAGE.rglob("*.py"):
        stage = _stage(path)
        if stage not in ORDER or stage in ("cli", "__init__") or path.name == "cli.py":
            continue  # each stage's cli.py is a piece of the top-level app, which may call any stage
        for name in _imports(path):
            if not name.startswith("inferforge."):
                continue
            target = name.split(".")[1]
            if target in ORDER and ORDER.index(target) > ORDER.index(stage):
                violations.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert violations == []


def test_engine_cores_import_no_web_framework() -> None:
    cores = [
        *(PACKAGE / "llm").rglob("*.py"),
        *(PACKAGE / "serve" / "engine").rglob("*.py"),
        *[
            p
            for p in PACKAGE.rglob("*.py")
            if _stage(p) in ("models", "techniques", "quality", "bench", "tune", "registry")
        ],
    ]
    offenders = [
        f"{p.relative_to(PACKAGE)}: {n}" for p in cores for n in _imports(p) if n.split(".")[0] in WEB
    ]
    assert cores and offenders == []


def test_import_inferforge_is_cheap() -> None:
    code = (
        "import sys, inferforge, inferforge.cli; heavy = [m for m in ('torch', 'transformers', "
        "'onnxruntime', 'torchao', 'fastapi', 'ray') if m in sys.modules]; print(','.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == ""
