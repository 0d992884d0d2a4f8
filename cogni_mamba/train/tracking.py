"""Experiment trackers beside metrics.jsonl: TensorBoard, Weights & Biases and trackio (all optional).

`metrics.jsonl` and `loss.png` are always written; `train.log_to` (`--log tensorboard wandb`) adds
trackers that receive the same records: each record's finite numbers under `train/` (loss, lr,
grad_norm, tokens_per_s, tokens_seen, mfu) or `val/` (loss, ppl), at the record's step, and the whole
config once at the start. Each tracker's package is an optional extra (`pip install
"cogni-mamba[track]"` for TensorBoard); a missing one is one sentence before training starts.
W&B and trackio follow their own environment settings (`WANDB_MODE=offline`, `WANDB_PROJECT`, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..config import TRACKERS
from ..errors import CogniError

_VAL_KEYS = {"val_loss": "val/loss", "val_ppl": "val/ppl"}
_SKIP = {"step", "epoch", "bad_steps"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers under tracker names ("train/loss", "val/loss", ...)."""
    out = {}
    for key, value in record.items():
        if key in _SKIP or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        out[_VAL_KEYS.get(key, f"train/{key}")] = float(value)
    return out


def _missing(name: str, package: str, extra: str) -> CogniError:
    return CogniError(f"--log {name} needs the {package} package, which is not installed; "
                      f"pip install {extra} (or drop --log {name}).")


class TensorBoardTracker:
    """Event files under <out>/tensorboard (`tensorboard --logdir <out>/tensorboard` shows them)."""

    def __init__(self, out_dir: Path, config: dict[str, Any], run_name: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard", '"cogni-mamba[track]"') from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + _pretty(config) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run (online, or offline with WANDB_MODE=offline: `wandb sync` uploads it later).

    W&B keeps one row per step and drops values logged to a step it has already committed, while the
    trainer writes a step's training record and its evaluation record separately: a step's values are
    gathered and sent as one row when the next step begins (and at the end)."""

    def __init__(self, out_dir: Path, config: dict[str, Any], run_name: str):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb", "wandb") from None
        self.run = wandb.init(project="cogni-mamba", name=run_name, dir=str(out_dir), config=config)
        self.step: int | None = None
        self.row: dict[str, float] = {}

    def log(self, values: dict[str, float], step: int) -> None:
        if step != self.step:
            self.flush()
            self.step = step
        self.row.update(values)

    def flush(self) -> None:
        if self.row:
            self.run.log(self.row, step=self.step, commit=True)
            self.row = {}

    def close(self) -> None:
        self.flush()
        self.run.finish()


class TrackioTracker:
    """A trackio run (local-first: stored on this machine, `trackio show` opens its dashboard)."""

    def __init__(self, out_dir: Path, config: dict[str, Any], run_name: str):
        try:
            import trackio
        except ImportError:
            raise _missing("trackio", "trackio", "trackio") from None
        self.trackio = trackio
        trackio.init(project="cogni-mamba", name=run_name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


def check_trackers(names: list[str] | tuple[str, ...]) -> None:
    """One sentence for an unknown tracker name (before anything is built)."""
    for name in names:
        if name not in _CLASSES:
            raise CogniError(f"Unknown tracker {name!r} in --log; choose from: {', '.join(TRACKERS)}.")


class Trackers:
    """The run's trackers as one: `log(record)` with a metrics.jsonl record, `close()` at the end."""

    def __init__(self, names: list[str] | tuple[str, ...], out_dir: str | Path, config: dict[str, Any]):
        check_trackers(names)
        out = Path(out_dir)
        self.trackers = [_CLASSES[name](out, config, out.name) for name in dict.fromkeys(names)]

    def log(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values and "step" in record:
            for tracker in self.trackers:
                tracker.log(values, int(record["step"]))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _pretty(config: dict[str, Any]) -> str:
    import json

    return json.dumps(config, indent=2, default=str)
