"""Python code documents from this interpreter's own standard library, in the CodeSearchNet layout.

Functions and methods that have a docstring are cut out of the stdlib's `.py` files (tests and
site-packages left out), dedented, and written with `codesearchnet_document`. Files are visited in an
order shuffled by the seed; very long functions and docstrings are skipped so the demo corpus stays
small and each document fits a short context.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path

from ..data.codesearchnet import codesearchnet_document

MAX_CODE_CHARS = 1500
MAX_DOC_CHARS = 600
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "lib2to3", "turtledemo", "ensurepip", "venv"})


def stdlib_dir() -> Path:
    """Where the running interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib's .py files outside test and package folders, sorted."""
    root = root or stdlib_dir()
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of module-level functions and of the methods of module-level classes."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            yield from ((f"{node.name}.{n.name}", n) for n in node.body
                        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of a stdlib file (`json/decoder.py` -> json.decoder, `re/__init__.py` -> re)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _parses(code: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old escapes in stdlib sources are not our concern
            ast.parse(code)
        return True
    except SyntaxError:
        return False


def file_documents(path: Path, module: str) -> Iterator[str]:
    """CodeSearchNet documents for the documented functions of one source file (none if it does not parse)."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for qualname, node in _functions(tree):
        docstring = ast.get_docstring(node)
        # A body that is only the docstring would leave no code once the docstring moves to the header.
        if not docstring or len(docstring) > MAX_DOC_CHARS or len(node.body) < 2:
            continue
        code = textwrap.dedent("".join(lines[node.lineno - 1: node.end_lineno]))  # whole lines from `def`
        if len(code) > MAX_CODE_CHARS or not _parses(code):
            continue
        yield codesearchnet_document(f"{module}.{qualname}", docstring, code)


def stdlib_documents(seed: int, root: Path | None = None) -> Iterator[str]:
    """Documents from every stdlib file once, files in an order shuffled by the seed."""
    root = root or stdlib_dir()
    files = stdlib_files(root)
    random.Random(f"code:{seed}").shuffle(files)
    for path in files:
        yield from file_documents(path, module_name(path, root))
