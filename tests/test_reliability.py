"""When the machine runs out: a full disk at a save, a run that cannot fit, through the real CLI.

The disk-full runs inject ENOSPC at the checkpoint write (tests/fault_cli.py) and, where this machine
lets the test mount one, also fill a real small tmpfs. The reference is an uninterrupted run of the
same command: a run resumed after the failure must log exactly its losses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cogni_mamba.checkpoint import load_checkpoint
from cogni_mamba.data import prepare
from cogni_mamba.errors import CogniError
from cogni_mamba.tokenizer import SimpleTokenizer
from cogni_mamba.train import preflight
from tests.references import logged_losses

pytestmark = pytest.mark.slow

FAULT = Path(__file__).with_name("fault_cli.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set",
        "model.n_kv_heads=1", "--set", "model.hidden_dim=64", "--set", "model.max_seq_len=32", "--set",
        "data.seq_len=32", "--set", "train.batch_size=2", "--set", "train.grad_accum=1", "--set",
        "train.save_interval=4", "--set", "train.eval_interval=4", "--set", "train.eval_batches=1", "--set",
        "train.warmup_steps=2", "--set", "train.keep_last=2", "--set", "train.lr=3e-3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    docs = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"the cat {i} sat on the mat and the dog {i % 7} ran"}) + "\n"
                            for i in range(400)))
    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare([str(docs)], SimpleTokenizer(), out, val_fraction=0.1, progress=False)
    return out


def train(data: Path, out: Path, *extra: str, fail_save: int | None = None, steps: int = 12
          ) -> subprocess.CompletedProcess:
    fault = ["--fail-save", str(fail_save)] if fail_save else []
    cmd = [sys.executable, str(FAULT), *fault, "--", "train", "--preset", "nano", "--data", str(data), "--tokenizer",
           "simple", "--out", str(out), "--max-steps", str(steps), "--precision", "fp32", "--quiet", *TINY, *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = train(data, run)
    assert proc.returncode == 0, proc.stderr
    losses = logged_losses(run)
    assert sorted(losses) == list(range(1, 13))
    return losses


def assert_one_sentence(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def no_partial_files(run: Path) -> None:
    leftovers = [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert not leftovers, leftovers


def test_disk_full_at_the_first_save(data, tmp_path):
    run = tmp_path / "run"
    proc = train(data, run, fail_save=1)
    assert_one_sentence(proc, "Could not save the checkpoint at step 4", "No space left on device",
                        "no earlier checkpoint exists")
    no_partial_files(run)
    assert not (run / "step-4").exists() and not (run / "latest").exists()


def test_disk_full_at_a_later_save_then_resume_matches_an_unbroken_run(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = train(data, run, fail_save=2)  # saves at steps 4, 8, 12: the one at step 8 fails
    assert_one_sentence(proc, "Could not save the checkpoint at step 8", "step-4", "--resume")
    no_partial_files(run)
    assert (run / "latest").read_text().strip() == "step-4" and not (run / "step-8").exists()
    load_checkpoint(run)  # the last good checkpoint loads (checksums included)
    proc = train(data, run, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert logged_losses(run) == reference  # exact: fp32, deterministic CPU ops


def test_continue_on_save_error_retries_at_the_next_save(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = train(data, run, "--set", "train.on_save_error=continue", fail_save=2)
    assert proc.returncode == 0, proc.stderr
    assert "Could not save the checkpoint at step 8" in proc.stdout + proc.stderr
    assert (run / "latest").read_text().strip() == "step-12"
    assert logged_losses(run) == reference


def _can_mount_tmpfs(path: Path) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(path)], check=False)
    return ok


def test_a_real_small_filesystem_fills_at_a_later_save(data, reference, tmp_path):
    mnt = tmp_path / "small"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs root and mount); the injected ENOSPC tests cover this")
    probe = tmp_path / "probe"
    assert train(data, probe, steps=4).returncode == 0
    one = sum(p.stat().st_size for p in (probe / "step-4").rglob("*") if p.is_file())
    # room for the first checkpoint, metrics and plot, but not for a second checkpoint beside it
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(one * 1.6) + 192 * 1024}", "tmpfs", str(mnt)], check=True)
    try:
        run = mnt / "run"
        proc = train(data, run, "--force")  # the pre-flight check would refuse this disk, rightly
        error = assert_one_sentence(proc, "Could not save the checkpoint at step", "No space left on device",
                                    "--resume")
        failed_at = int(re.search(r"at step (\d+)", error)[1])
        assert failed_at > 4  # the first checkpoint fitted, a later one did not
        no_partial_files(run)
        assert (run / "latest").read_text().strip() == f"step-{failed_at - 4}"
        load_checkpoint(run)
        moved = tmp_path / "moved"
        shutil.copytree(run, moved)  # "free some space": continue on a disk with room
        assert train(data, moved, "--resume").returncode == 0
        assert logged_losses(moved) == reference
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --- pre-flight -----------------------------------------------------------------------------------

def test_checkpoint_estimate_matches_a_saved_checkpoint(data, tmp_path):
    from cogni_mamba.model import CogniMamba
    from cogni_mamba.train.optim import build_optimizer

    run = tmp_path / "run"
    assert train(data, run, steps=4).returncode == 0
    actual = sum(p.stat().st_size for p in (run / "step-4").rglob("*") if p.is_file())
    cfg = load_checkpoint(run)[0].config
    model = CogniMamba(cfg)
    from cogni_mamba.config import TrainConfig

    estimate = preflight.checkpoint_bytes(model, build_optimizer(model, TrainConfig(), "cpu"))
    # the estimate counts 4 MiB of slack for config, tokenizer and state; the tensors themselves agree
    assert abs((estimate - preflight.SLACK_BYTES) - actual) < 0.1 * actual + 64 * 1024, (estimate, actual)


def test_a_run_whose_checkpoints_cannot_fit_is_refused_before_its_first_step(data, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "free_disk", lambda path: 5 * 1024**2)  # 5 MiB free
    run = tmp_path / "run"
    with pytest.raises(CogniError, match=r"checkpoints need about .* but only 5.0 MiB is free; .* --force"):
        _run_in_process(data, run)
    assert not (run / "metrics.jsonl").exists()  # not one step was taken


def test_a_run_over_free_memory_is_refused_and_force_warns(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "free_memory", lambda device: 1024)  # 1 KiB "free"
    with pytest.raises(CogniError, match=r"needs about .* of RAM \(estimated\) but only 0.0 MiB is free"):
        _run_in_process(data, tmp_path / "a")
    _run_in_process(data, tmp_path / "b", "--force", steps=2)
    assert "warning (--force): Training this model needs about" in capsys.readouterr().out
    assert sorted(logged_losses(tmp_path / "b")) == [1, 2]


def _run_in_process(data: Path, out: Path, *extra: str, steps: int = 4) -> None:
    """The CLI in this process (so the figures can be replaced), raising its CogniError."""
    from cogni_mamba.cli import build_parser

    args = build_parser().parse_args(["train", "--preset", "nano", "--data", str(data), "--tokenizer", "simple",
                                      "--out", str(out), "--max-steps", str(steps), "--precision", "fp32",
                                      "--quiet", *TINY, *extra])
    torch.set_num_threads(1)
    args._run(args)
