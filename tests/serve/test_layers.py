"""The engine core imports no web framework, and importing the serve package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

WEB = ("fastapi", "starlette", "uvicorn", "httpx", "h11", "prometheus_client")


@pytest.mark.parametrize("module", ["inferforge.serve.engine", "inferforge.serve.repository"])
def test_engine_core_imports_no_web_framework(module: str) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {WEB!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "", f"{module} pulled in {loaded}"


def test_importing_serve_and_its_cli_is_cheap() -> None:
    code = (
        "import sys, inferforge.serve, inferforge.serve.cli; "
        "print(','.join(m for m in ('torch', 'fastapi', 'uvicorn', 'transformers') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == ""
