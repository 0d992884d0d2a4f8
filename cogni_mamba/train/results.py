"""What a training step and a training run report."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    applied: bool
    loss: float
    grad_norm: float
    lr: float
    tokens: int
    seconds: float
    reason: str = ""  # why a step was not applied: "nonfinite_loss", "nonfinite_grad", "scaler_skip"


@dataclass
class TrainResult:
    """The end-of-run summary."""

    steps: int
    best_val_loss: float | None
    tokens_seen: int
    seconds: float
    bad_steps: int
    stopped: str  # "finished", "signal" or "time"

    def summary(self) -> str:
        best = f"{self.best_val_loss:.4f} (ppl {math.exp(min(self.best_val_loss, 50)):.2f})" \
            if self.best_val_loss is not None else "n/a"
        return (f"{self.stopped}: {self.steps} steps, best val loss {best}, {self.tokens_seen:,} tokens seen, "
                f"{self.seconds / 60:.1f} min, {self.bad_steps} skipped non-finite steps")
