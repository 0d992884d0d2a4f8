"""How many optimizer steps a run takes: from the step budget or the epoch count, and, with a time
budget, as many as fit in it (planned up front, then re-fitted to the pace as the run goes)."""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..errors import CogniError


def step_limit(cfg: TrainConfig, planned: int) -> int | None:
    """The most steps a run may take: train.max_steps when set; else, with a time budget, none (the
    clock ends the run; `planned`, from the epoch count, is only the first plan); else the epochs'."""
    if cfg.max_steps is None and cfg.max_minutes is not None:
        return None
    return planned


def schedule_length(cfg: TrainConfig, batches: Any) -> tuple[int, int | None]:
    """(total optimizer steps, steps per epoch or None) from the step budget or the epoch count."""
    per_epoch = getattr(batches, "batches_per_epoch", None)
    steps_per_epoch = max(1, int(per_epoch) // cfg.grad_accum) if per_epoch else None
    if cfg.max_steps is not None:
        return cfg.max_steps, steps_per_epoch
    if steps_per_epoch is None:
        raise CogniError("The batch source does not say how long an epoch is; set train.max_steps "
                         "(e.g. --max-steps 1000).")
    return cfg.epochs * steps_per_epoch, steps_per_epoch


def fit_to_budget(step: int, steps_taken: int, elapsed_s: float, budget_s: float, planned: int, *,
                  may_grow: bool = False, limit: int | None = None) -> int:
    """The step count that ends within the time budget at the pace so far: never more than `planned`,
    or with `may_grow` as many as fit, up to `limit` (None: no limit).

    With a time budget the schedule then reaches min_lr when the time runs out, instead of the run
    being cut off halfway down the schedule or ending early when it goes faster than first measured.
    The trainer lets a plan grow only where its learning rate allows: a warmup-stable-decay schedule
    still in its stable phase (a cosine that grew would raise the rate again).
    """
    if steps_taken <= 0 or elapsed_s <= 0:
        return planned
    pace = elapsed_s / steps_taken  # seconds per step, evaluations and checkpoints included
    fits = step + int((budget_s - elapsed_s) / pace)
    ceiling = (limit if limit is not None else fits) if may_grow else planned
    return max(step, min(ceiling, fits))
