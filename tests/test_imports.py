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
