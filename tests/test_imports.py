"""Inference does not depend on the training package: loading a checkpoint to chat, serve or export
must not import `cogni_mamba.train` (checked in a fresh interpreter, where nothing is imported yet)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

INFERENCE_MODULES = ["cogni_mamba", "cogni_mamba.checkpoint", "cogni_mamba.inference", "cogni_mamba.chat", "cogni_mamba.serve",
                     "cogni_mamba.export", "cogni_mamba.cli.generate", "cogni_mamba.cli.chat"]


@pytest.mark.parametrize("module", INFERENCE_MODULES)
def test_inference_modules_do_not_import_train(module):
    code = (f"import json, sys, {module}\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cogni_mamba'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert module in loaded  # the probe really imported it
    assert not [m for m in loaded if m == "cogni_mamba.train" or m.startswith("cogni_mamba.train.")]


def test_load_checkpoint_does_not_import_train(tmp_path):
    """Loading weights through the public entry point stays outside train/ too."""
    from cogni_mamba.config import Config, preset
    from cogni_mamba.model import CogniMamba
    from cogni_mamba.train.checkpoint import save_checkpoint

    cfg: Config = preset("nano")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=64, n_layers=1, n_heads=4, n_kv_heads=2,
                                                             hidden_dim=128, vocab_size=320, max_seq_len=32))
    model = CogniMamba(cfg.model)
    save_checkpoint(tmp_path, "step-1", model, cfg, info={"step": 1})
    code = ("import json, sys, torch\n"
            "from cogni_mamba import load_checkpoint\n"
            f"model, tok = load_checkpoint({str(tmp_path)!r})\n"
            "print(json.dumps([sum(float(p.sum()) for p in model.parameters()),"
            " [m for m in sys.modules if m.startswith('cogni_mamba.train')]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    total, train_modules = json.loads(out.stdout.strip().splitlines()[-1])
    assert train_modules == []
    assert total == pytest.approx(sum(float(p.detach().sum()) for p in model.parameters()), rel=1e-5)


# --- no import cycles inside the package -----------------------------------------------------------

def import_graph(root) -> dict[str, set[str]]:
    """module -> the package modules it imports, read from the source: module-level imports and the ones
    inside functions alike (a lazy import that closes a loop is still a loop between two modules)."""
    import ast
    from pathlib import Path

    root = Path(root)

    def name(path: Path) -> str:
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name(p): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else (node.module or "")
                for alias in node.names:  # `from .pkg import mod` imports the module mod, else pkg itself
                    target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base
                    if target in files and target != module:
                        graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_loop(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("def g():\n    from .sub import b\n")  # lazy, inside a function
    (pkg / "sub" / "b.py").write_text("from ..c import h\n")
    (pkg / "c.py").write_text("from . import a\n")
    (pkg / "d.py").write_text("import pkg.a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_the_package_has_no_import_cycle():
    from pathlib import Path

    import cogni_mamba

    assert cycles(import_graph(Path(cogni_mamba.__file__).parent)) == []


def test_the_cli_prints_our_warnings_as_one_line_and_others_as_python_does():
    from cogni_mamba import cli

    ours = cli._one_line_for_ours(UserWarning("int8 runs fbgemm's product."), UserWarning,
                                  "/x/cogni_mamba/inference/precision.py", 7)
    assert ours == "warning: int8 runs fbgemm's product.\n"
    theirs = cli._one_line_for_ours(DeprecationWarning("old"), DeprecationWarning, "/x/torch/thing.py", 3)
    assert theirs.startswith("/x/torch/thing.py:3: DeprecationWarning: old")
