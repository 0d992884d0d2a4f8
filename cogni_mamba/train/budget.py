"""How many optimizer steps a run takes: from the step budget or the epoch count, and, with a time
budget, as many as fit in it (planned up front, then re-fitted to the pace as the run goes)."""

from __future__ import annotations

from typing import Any

from ..config import TrainConfig
from ..errors import CogniError


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


def steps_in_budget(budget_s: float, step_s: float, cfg: TrainConfig) -> int:
    """Optimizer steps that fit a time budget at `step_s` seconds a step, counting each evaluation
    (forward only: ~1/3 of a step per batch). The first plan; `fit_to_budget` corrects it as the run goes."""
    eval_s = cfg.eval_batches / 3 * step_s / cfg.grad_accum
    per_step = step_s + eval_s / cfg.eval_interval
    return max(1, int(budget_s / per_step))


def fit_to_budget(step: int, steps_taken: int, elapsed_s: float, budget_s: float, planned: int) -> int:
    """The step count that ends within the time budget at the pace so far, never more than planned.

    With a time budget the schedule then reaches min_lr when the time runs out, instead of the
    run being cut off halfway down the schedule.
    """
    if steps_taken <= 0 or elapsed_s <= 0:
        return planned
    pace = elapsed_s / steps_taken  # seconds per step, evaluations and checkpoints included
    return max(step, min(planned, step + int((budget_s - elapsed_s) / pace)))
