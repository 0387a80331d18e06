"""Real English text every Python install carries: the first paragraphs of the standard library's docstrings.

Read from source with `ast`, never by importing, so collecting text runs no module code and is deterministic.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "asyncio.events",
    "asyncio.tasks",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "dis",
    "email.message",
    "enum",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "ipaddress",
    "json.decoder",
    "json.encoder",
    "locale",
    "logging",
    "mailbox",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "os",
    "pathlib",
    "pdb",
    "pickle",
    "pkgutil",
    "platform",
    "plistlib",
    "poplib",
    "pprint",
    "pydoc",
    "queue",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "socket",
    "socketserver",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "trace",
    "traceback",
    "types",
    "typing",
    "unittest.case",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "webbrowser",
    "zipfile",
)


def _docstrings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    nodes = [tree, *[n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)]]
    texts = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            paragraph = " ".join(doc.split("\n\n")[0].split())
            texts.append(paragraph)
    return texts


def stdlib_sentences(limit: int = 256, *, min_chars: int = 40, max_chars: int = 200) -> list[str]:
    """Up to `limit` distinct docstring paragraphs, in a fixed order so the data fingerprint is stable."""
    seen: set[str] = set()
    out: list[str] = []
    for name in MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        for text in _docstrings(Path(spec.origin)):
            if min_chars <= len(text) <= max_chars and text not in seen and any(c.isalpha() for c in text):
                seen.add(text)
                out.append(text)
    out.sort(key=lambda t: (hash_key(t), t))
    return out[:limit]


def hash_key(text: str) -> str:
    """A stable shuffle key, so the first N texts mix modules instead of all coming from `argparse`."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()
