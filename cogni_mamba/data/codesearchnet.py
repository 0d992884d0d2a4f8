"""The document layout for one code function, shared by CodeSearchNet and the demo's stdlib corpus.

Layout (the docstring comes first so that a model learns docstring -> code):

    # function: <func_name>
    \"\"\"
    <docstring, dedented>
    \"\"\"
    <the code, dedented, with its own docstring removed>

A function without a docstring has no quoted block.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import warnings

# A triple-quoted literal on its own statement line (the docstring), for code `ast` cannot parse
# (CodeSearchNet holds Python 2 functions too).
_DOCSTRING_RE = re.compile(r'^[ \t]*[rRuUbB]{0,2}("""|\'\'\')(?:.|\n)*?\1[ \t]*(?:\n|$)', re.MULTILINE)


def _remove_docstring_ast(code: str) -> str | None:
    """The code without its docstring's lines, or None when it does not parse as one function."""
    try:
        with warnings.catch_warnings():  # old code has invalid escapes; that is the data, not our problem
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    body = tree.body[0].body
    first = body[0] if body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return code  # no docstring to remove
    lines = code.splitlines(keepends=True)
    # A one-line function such as `def f(): "doc"` keeps its line; removing it would break the code.
    if first.lineno == tree.body[0].lineno:
        return code
    return "".join(lines[: first.lineno - 1] + lines[first.end_lineno:])


def remove_docstring(code: str) -> str:
    """`code` (one function) without its docstring; the code unchanged when it has none."""
    stripped = _remove_docstring_ast(code)
    if stripped is not None:
        return stripped
    # Only a literal that comes right after the signature is the docstring.
    match = _DOCSTRING_RE.search(code)
    if match and code[: match.start()].rstrip().endswith(":"):
        return code[: match.start()] + code[match.end():]
    return code


def codesearchnet_document(func_name: str, docstring: str, code: str) -> str:
    """One function as one training document: a name header, the docstring, then the code without it."""
    code = textwrap.dedent(remove_docstring(textwrap.dedent(code))).strip("\n").rstrip()
    doc = inspect.cleandoc(docstring or "").replace('"""', '\\"\\"\\"')
    parts = [f"# function: {func_name.strip()}"]
    if doc:
        parts.append(f'"""\n{doc}\n"""')
    parts.append(code)
    return "\n".join(parts) + "\n"
