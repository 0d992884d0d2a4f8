"""What stops or protects a run: signals, the agreed stop reason, rollback after non-finite steps, and
out-of-memory advice.

Each piece is policy only; the trainer makes the one cross-rank call (`max_over_ranks`) that turns a
rank's wish to stop into the decision every rank takes at the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

from ..config import TrainConfig
from ..errors import CogniError
from . import checkpoint as ckpt

MAX_ROLLBACKS = 2
STOP_REASONS = ("", "time", "signal")  # ranked: a signal on any rank outranks the clock on another


def stop_wish(signalled: bool, over_time: bool) -> int:
    """This rank's wish as an index into STOP_REASONS (0: go on); the run takes the largest over ranks."""
    return STOP_REASONS.index("signal") if signalled else STOP_REASONS.index("time") if over_time else 0


class StopSignals:
    """While entered (from the main thread), SIGTERM or SIGINT set `requested`: the run saves at the end
    of this step and stops. A second one stops at once, without saving (KeyboardInterrupt)."""

    def __init__(self, log: Callable[[str], None]):
        self.requested = False
        self._log = log
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self._log(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def oom_advice(shape: tuple[int, ...] | None, cfg: TrainConfig, precision: str, world_size: int) -> str:
    """The one-sentence message for an out-of-memory step: where it happened and what to lower."""
    where = f"a micro batch of {shape[0]} x {shape[1]} tokens" if shape else f"train.batch_size {cfg.batch_size}"
    fixes = [f"lower train.batch_size (now {cfg.batch_size}) and raise train.grad_accum (now {cfg.grad_accum}) "
             "to keep the effective batch", "lower data.seq_len"]
    if precision == "fp32":
        fixes.append("use --precision bf16")
    if world_size > 1 and cfg.parallel != "fsdp":
        fixes.append("shard the model with --set train.parallel=fsdp")
    fixes.append("or pick a smaller --preset")
    return f"Out of memory while training on {where}: " + ", ".join(fixes) + "."


def roll_back(trainer) -> None:
    """After `max_bad_steps` non-finite steps in a row: reload the trainer's last checkpoint at half the LR,
    keeping its place in the data (the batches that went bad are not replayed). The third time, or
    before the first checkpoint, the run stops with a CogniError."""
    msg = (f"{trainer.bad_streak} non-finite steps in a row at step {trainer.step}; lower train.lr, use "
           "--precision bf16 or fp32, or check the data for corrupt tokens.")
    if trainer.rollbacks >= MAX_ROLLBACKS:
        raise CogniError(f"Training diverged: {msg}")
    try:
        where = ckpt.find_checkpoint(trainer.out_dir)
    except ckpt.CheckpointError:
        raise CogniError(f"Training diverged before the first checkpoint: {msg}") from None
    streak, rollbacks, scale = trainer.bad_streak, trainer.rollbacks + 1, trainer.lr_scale * 0.5
    get_loader = getattr(trainer.train_batches, "state_dict", None)
    loader_state = get_loader() if callable(get_loader) else None
    iterator = trainer._iter
    trainer.resume(where)
    if loader_state is not None:
        trainer.train_batches.load_state_dict(loader_state)
        trainer._iter = iter(trainer.train_batches)
    else:
        trainer._iter = iterator
    trainer.rollbacks, trainer.lr_scale, trainer.bad_streak = rollbacks, scale, 0
    trainer.log(f"warning: {streak} non-finite steps in a row; reloaded {where.name} with the LR scaled by {scale}")
