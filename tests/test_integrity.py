"""Silent corruption: one flipped byte in any file of a checkpoint or a prepared folder is found on
load and by `cogni-mamba verify`, and named in one sentence."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogni_mamba.checkpoint import CheckpointError, load_checkpoint_full
from cogni_mamba.config import Config, ModelConfig
from cogni_mamba.data import TokenBatches, prepare
from cogni_mamba.errors import CogniError
from cogni_mamba.integrity import IntegrityError, seal_text, unseal
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer
from cogni_mamba.train.checkpoint import load_train_state, load_weights, save_checkpoint


def flip_byte(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    i = rng.randrange(len(data))
    data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def verify_cli(*paths: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogni_mamba", "verify", *map(str, paths)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=320, hidden_dim=64, max_seq_len=32)
    model = CogniMamba(cfg)
    opt = torch.optim.AdamW(model.parameters())
    _, loss = model(torch.randint(0, 320, (1, 8)), torch.randint(0, 320, (1, 8)))
    loss.backward()
    opt.step()
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run, "step-1", model, Config(model=cfg), tokenizer=SimpleTokenizer(),
                    train_state={"step": 1, "optimizer": opt.state_dict()}, info={"step": 1})
    return run / "step-1"


def all_files(root: Path) -> list[Path]:
    """Every file with at least one byte to flip."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.stat().st_size)


def test_seal_round_trip_and_every_byte_of_the_text_matters():
    record = {"step": 12, "sha256": {"x.bin": "ab" * 32}}
    text = seal_text(record, indent=2)
    assert unseal(text, indent=2) == (record, True)
    assert unseal('{"a": 1}') == ({"a": 1}, False)  # written before checksums: read, not checked
    for i in range(len(text)):
        changed = text[:i] + chr(ord(text[i]) ^ 1) + text[i + 1:]
        with pytest.raises(IntegrityError):
            unseal(changed, indent=2)


def test_a_whole_checkpoint_loads_and_verifies(checkpoint):
    model, tok, _ = load_checkpoint_full(checkpoint)
    assert tok is not None and model.config.dim == 32
    assert load_train_state(checkpoint)["step"] == 1
    proc = verify_cli(checkpoint, checkpoint.parent)
    assert proc.returncode == 0, proc.stderr
    assert "ok:" in proc.stdout


def test_a_flipped_byte_in_any_checkpoint_file_is_found(checkpoint, tmp_path):
    files = [p.relative_to(checkpoint) for p in all_files(checkpoint)]
    assert {"model.safetensors", "config.json", "train_state.pt", "complete.json"} <= {f.as_posix() for f in files}
    assert any(f.parts[0] == "tokenizer" for f in files)
    rng = random.Random(0)
    for rel in files:
        damaged = tmp_path / rel.as_posix().replace("/", "_") / "step-1"
        shutil.copytree(checkpoint, damaged)
        flip_byte(damaged / rel, rng)
        # training reads every file (weights, config, tokenizer, optimizer state)
        with pytest.raises(CheckpointError, match=rf"{rel.name}.*(damaged|checksum)"):
            load_weights(CogniMamba(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=320,
                                                hidden_dim=64, max_seq_len=32)), damaged)
        if rel.name != "train_state.pt":  # inference does not read the optimizer state
            with pytest.raises(CogniError, match=rf"{rel.name}"):
                load_checkpoint_full(damaged)
        proc = verify_cli(damaged)
        assert proc.returncode == 1 and rel.name in proc.stderr, (rel, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_no_verify_escape_loads_a_damaged_weight_file(checkpoint, tmp_path, monkeypatch):
    damaged = tmp_path / "step-1"
    shutil.copytree(checkpoint, damaged)
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-1] ^= 1  # inside the last tensor's data, so the file still parses
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint_full(damaged)
    monkeypatch.setenv("COGNI_MAMBA_NO_VERIFY", "1")
    load_checkpoint_full(damaged)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "prepared"
    texts = tmp_path_factory.mktemp("texts") / "docs.jsonl"
    texts.write_text("".join(json.dumps({"text": f"story number {i} about a cat and a dog"}) + "\n"
                             for i in range(200)))
    prepare([str(texts)], SimpleTokenizer(), out, val_fraction=0.2, progress=False)
    return out


def test_a_flipped_byte_in_any_prepared_file_is_found(prepared, tmp_path):
    TokenBatches([prepared], 8, 2)  # whole: loads
    assert verify_cli(prepared).returncode == 0
    rng = random.Random(1)
    for name in ("train.bin", "val.bin", "meta.json"):
        damaged = tmp_path / name / "prepared"
        shutil.copytree(prepared, damaged)
        flip_byte(damaged / name, rng)
        split = "val" if name == "val.bin" else "train"
        with pytest.raises(CogniError, match=rf"{name}.*(damaged|checksum)"):
            TokenBatches([damaged], 8, 2, split=split)
        proc = verify_cli(damaged)
        assert proc.returncode == 1 and name in proc.stderr, (name, proc.stdout, proc.stderr)
