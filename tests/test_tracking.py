"""Experiment trackers: what a short run logs reads back from TensorBoard's event files (and W&B's
offline run) with the same numbers as metrics.jsonl."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_worker import RandomTokens, tiny_model_config  # noqa: E402

from cogni_mamba.config import Config, ConfigError, TrainConfig  # noqa: E402
from cogni_mamba.errors import CogniError  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402
from cogni_mamba.train.tracking import Trackers, scalars  # noqa: E402


def read_tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_scalars_names_and_filters_a_record():
    record = {"step": 7, "epoch": 0, "loss": 2.5, "lr": 1e-3, "grad_norm": float("nan"), "tokens_per_s": 100,
              "skipped": "nonfinite_loss", "val_loss": 2.0, "val_ppl": math.exp(2.0), "flag": True}
    assert scalars(record) == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens_per_s": 100.0,
                               "val/loss": 2.0, "val/ppl": math.exp(2.0)}


def test_unknown_tracker_is_one_sentence():
    with pytest.raises(ConfigError, match="unknown tracker 'mlflow'"):
        TrainConfig(log_to=["mlflow"])
    with pytest.raises(CogniError, match="Unknown tracker"):
        Trackers(["mlflow"], "/tmp", {})


def test_a_short_run_reads_back_from_tensorboard_as_in_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (cogni-mamba[track])")
    from cogni_mamba.train import Trainer

    torch.manual_seed(0)
    model = CogniMamba(tiny_model_config())
    cfg = TrainConfig(batch_size=4, grad_accum=1, max_steps=6, lr=3e-3, warmup_steps=2, eval_interval=3, eval_batches=1,
                      save_interval=6, precision="fp32", out_dir=str(tmp_path), log_to=["tensorboard"])
    val = [next(RandomTokens(4, 16, seed=99))]
    trainer = Trainer(model, RandomTokens(4, 16, seed=7, batches_per_epoch=10), val, cfg,
                      config=Config(model=model.config, train=cfg), device=torch.device("cpu"), progress=False,
                      log=lambda m: None)
    trainer.train()

    records = trainer.metrics.read()
    logged = read_tensorboard(tmp_path / "tensorboard")
    want_loss = {r["step"]: r["loss"] for r in records if "loss" in r}
    want_val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(want_loss) == list(range(1, 7)) and sorted(want_val) == [3, 6]
    assert logged["train/loss"] == pytest.approx(want_loss, rel=1e-6)  # event files store float32
    assert logged["val/loss"] == pytest.approx(want_val, rel=1e-6)
    assert logged["train/lr"] == pytest.approx({r["step"]: r["lr"] for r in records if "lr" in r}, rel=1e-6)
    assert set(logged) >= {"train/grad_norm", "train/tokens_per_s", "train/tokens_seen", "val/ppl"}


def test_wandb_offline_run_holds_the_last_values(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is optional (pip install wandb)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path, {"train": {"lr": 1e-3}})
    run = trackers.trackers[0].run
    for step, loss in ((1, 3.0), (2, 2.5)):
        trackers.log({"step": step, "loss": loss, "lr": 1e-3})
    trackers.log({"step": 2, "val_loss": 2.25})  # the evaluation comes after the step's own record
    trackers.log({"step": 3, "loss": 2.0})  # a new step sends step 2's row, both values in it
    assert run.summary["train/loss"] == 2.5 and run.summary["val/loss"] == 2.25
    assert run.config["train"]["lr"] == 1e-3
    trackers.close()
    assert wandb.run is None
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_trackio_local_run_reads_back_as_logged(tmp_path):
    pytest.importorskip("trackio", reason="trackio is optional (pip install trackio)")
    import json
    import os
    import subprocess

    # trackio fixes its storage folder when imported, so the run goes in a fresh interpreter
    code = """
import json
from cogni_mamba.train.tracking import Trackers
from trackio.sqlite_storage import SQLiteStorage
trackers = Trackers(["trackio"], RUN_DIR, {"train": {"lr": 1e-3}})
for step, loss in ((1, 3.0), (2, 2.5)):
    trackers.log({"step": step, "loss": loss, "lr": 1e-3, "note": "not a number"})
trackers.log({"step": 2, "val_loss": 2.25})
trackers.close()
print(json.dumps(SQLiteStorage.get_logs("cogni-mamba", run="run7")))
""".replace("RUN_DIR", repr(str(tmp_path / "run7")))
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    got = {(r["step"], k): v for r in rows for k, v in r.items() if k.startswith(("train/", "val/"))}
    assert got == {(1, "train/loss"): 3.0, (1, "train/lr"): 1e-3, (2, "train/loss"): 2.5, (2, "train/lr"): 1e-3,
                   (2, "val/loss"): 2.25}
    assert (tmp_path / "trackio" / "cogni-mamba.db").is_file()  # stored where TRACKIO_DIR says, offline
