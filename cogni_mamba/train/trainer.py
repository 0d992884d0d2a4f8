"""The training loop: accumulation, mixed precision, evaluation, checkpoints, exact resume, faults.

`build_trainer(model, train_batches, val_batches, cfg.train, ...)` (train/build.py) places and wraps
the model and returns a `Trainer`, which takes any iterable of (x, y) batches; when the iterable has
`state_dict()` / `load_state_dict()` its position is saved in every checkpoint, and `batches_per_epoch`
(per process) lets the run count epochs. One optimizer step is `grad_accum` micro-batches on each of
`world_size` processes, whose model is wrapped in DDP or, with `train.parallel = "fsdp"`, sharded by
FSDP2 (checkpoints hold the full weights either way). `Trainer.train` is the loop; the pieces it calls
live beside it: budget.py (schedule length, time budget), guards.py (signals, stop reason, rollback,
out-of-memory advice), validation.py, preflight.py.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig, to_dict
from ..errors import CogniError, is_out_of_memory
from ..stats import flops_per_token
from . import checkpoint as ckpt
from .budget import fit_to_budget, schedule_length, step_limit
from .distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    current,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    grad_sync,
    is_sharded,
    load_full_optimizer_state,
    max_over_ranks,
    min_over_ranks,
)
from .guards import STOP_REASONS, StopSignals, oom_advice, roll_back, stop_wish
from .metrics import MetricsLog, device_peak_flops, plot_losses
from .optim import build_optimizer, lr_at, set_lr, wsd_decay_start
from .precision import autocast, load_scaler_state, make_scaler, resolve_precision
from .preflight import preflight_findings
from .results import StepOutcome, TrainResult
from .state import plain, rng_state, set_rng_state
from .tracking import Trackers
from .validation import validation_loss


class Trainer:
    """Trains `model` on `train_batches`, evaluating on the fixed `val_batches`, writing to `out_dir`."""

    def __init__(self, model: nn.Module, train_batches: Iterable, val_batches: Iterable | None, cfg: TrainConfig, *,
                 forward: nn.Module | None = None, config: Config | None = None, tokenizer: Any = None,
                 out_dir: str | Path | None = None, device: str | torch.device | None = None,
                 dist: DistInfo | None = None, progress: bool = True, log: Callable[[str], None] | None = None,
                 force: bool = False):
        """`model` is ready to train: on `device` (default: where its weights are), or sharded by FSDP2;
        `forward` is what a step calls (DDP and/or torch.compile around it; default `model`). Nothing is
        moved, wrapped or deleted here: `build_trainer` (train/build.py) does that and then calls this."""
        self.cfg = cfg
        self.force = force  # pre-flight refusals (disk, memory) become warnings
        self.dist = dist or current()
        self.raw_model, self.model = model, forward if forward is not None else model
        self.fsdp = is_sharded(model)
        where = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else where
        if not self.fsdp and where.type != self.device.type:
            raise ValueError(f"The model is on {where}, not {self.device}; build the trainer with "
                             "build_trainer(...), which places it.")
        self.precision = resolve_precision(cfg.precision, self.device)
        # Batches of varying length (chat fine-tuning): one graph with a dynamic sequence dimension.
        self.dynamic_length = cfg.compile and bool(getattr(train_batches, "variable_length", False))
        self.optimizer = build_optimizer(self.raw_model, cfg, self.device.type)
        self.scaler = make_scaler(self.precision, self.device)
        self.train_batches = train_batches
        self._iter = iter(train_batches)
        self.val_batches = list(val_batches) if val_batches is not None else []
        self.config = config or Config(model=self.raw_model.config, train=cfg)
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.total_steps, self.steps_per_epoch = schedule_length(cfg, train_batches)
        self.step_limit = step_limit(cfg, self.total_steps)  # None: the time budget ends the run
        self.progress = progress and self.dist.is_main
        self._log = log
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl")
        self.peak_flops = device_peak_flops(self.device)
        # Mutable run state (all of it goes into train_state.pt).
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.lr_scale = 1.0
        self.bad_steps = 0
        self.bad_streak = 0
        self.rollbacks = 0
        self._micro_shape: tuple[int, ...] | None = None

    # --- small pieces -----------------------------------------------------------------------------

    def log(self, message: str) -> None:
        """A line for the user, from rank 0 only (above the progress bar)."""
        if not self.dist.is_main:
            return
        if self._log is not None:
            self._log(message)
        else:
            from tqdm import tqdm

            tqdm.write(message)

    @property
    def epoch(self) -> int:
        """Completed epochs."""
        return self.step // self.steps_per_epoch if self.steps_per_epoch else 0

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self._iter)
        except StopIteration:  # a finite iterable (a list): start it over
            self._iter = iter(self.train_batches)
            return next(self._iter)

    # --- one step ---------------------------------------------------------------------------------

    def forward_backward(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Accumulate the gradients of the mean loss over `micro_batches`; return that mean loss.

        DDP / FSDP reduce gradients across ranks only on the last micro-batch.
        """
        n = len(micro_batches)
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro_batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self._micro_shape = tuple(x.shape)  # (B, T): named by the out-of-memory advice
            if self.dynamic_length:
                torch._dynamo.mark_dynamic(x, 1)
                torch._dynamo.mark_dynamic(y, 1)
            sync = i == n - 1 or not self.dist.enabled
            with grad_sync(self.raw_model if self.fsdp else self.model, sync):
                with autocast(self.precision, self.device):
                    _, loss = self.model(x, y, return_logits=False)  # the loss alone: no (B, T, V) logits kept
                self.scaler.scale(loss / n).backward()
            total += loss.detach().float()
        return total / n

    def train_step(self) -> StepOutcome:
        """One optimizer step; a step with a non-finite loss or gradient is not applied."""
        t0 = time.perf_counter()
        batches = [self._next_batch() for _ in range(self.cfg.grad_accum)]
        tokens = sum(int(x.numel()) for x, _ in batches) * self.dist.world_size
        loss = float(all_reduce_mean(self.forward_backward(batches), self.dist))
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        # DDP has already averaged the gradients, so every rank computes the same norm and decision.
        norm = float(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip))
        lr = lr_at(self.step, self.cfg, self.total_steps, self.lr_scale)
        reason = ""
        if not math.isfinite(loss):
            reason = "nonfinite_loss"
        elif not math.isfinite(norm):
            reason = "scaler_skip" if self.scaler.is_enabled() else "nonfinite_grad"
        if reason:
            if self.scaler.is_enabled():
                self.scaler.update()  # lowers the loss scale after inf/NaN gradients
        else:
            set_lr(self.optimizer, lr)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.step += 1
            self.tokens_seen += tokens
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(not reason, loss, norm, lr, tokens, time.perf_counter() - t0, reason)

    # --- evaluation and checkpoints ---------------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation batches (split across ranks), or None without any."""
        if not self.val_batches:
            return None
        return validation_loss(self.raw_model, self.val_batches, self.precision, self.device, self.dist)

    def train_state(self) -> dict[str, Any]:
        """Everything besides the weights that an exact resume needs (collective: call on all ranks)."""
        loader = getattr(self.train_batches, "state_dict", None)
        mine = {"loader": plain(loader()) if callable(loader) else None, "rng": rng_state()}
        return {
            "step": self.step, "epoch": self.epoch, "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss, "lr_scale": self.lr_scale, "bad_steps": self.bad_steps,
            "rollbacks": self.rollbacks, "total_steps": self.total_steps, "world_size": self.dist.world_size,
            "optimizer": full_optimizer_state(self.raw_model, self.optimizer) if self.fsdp
            else self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ranks": gather_objects(mine, self.dist),
        }

    def save(self, *, epoch_end: bool = False, best: bool = False) -> Path | None:
        """Write step-N (and link epoch-N / best to it); rank 0 writes, all ranks wait for it.

        A save that fails (disk full, or any OSError) leaves no partial files and the previous checkpoint
        and `latest` as they were; then the run stops with one sentence (a CogniError on every rank), or,
        with train.on_save_error=continue, logs it and goes on (None is returned)."""
        state = self.train_state()
        weights = full_model_state(self.raw_model) if self.fsdp else None  # gathered onto rank 0's CPU
        path, error = None, None
        if self.dist.is_main:
            name = f"step-{self.step}"
            info = {"step": self.step, "epoch": self.epoch, "val_loss": self.best_val_loss if best else None}
            try:
                path = ckpt.save_checkpoint(self.out_dir, name, self.raw_model, self.config, tokenizer=self.tokenizer,
                                            train_state=state, info=info, weights=weights)
                if epoch_end:
                    ckpt.link_checkpoint(self.out_dir, name, f"epoch-{self.epoch}")
                if best:
                    ckpt.link_checkpoint(self.out_dir, name, "best")
                ckpt.prune_step_checkpoints(self.out_dir, self.cfg.keep_last)
            except OSError as e:
                error = e
        if not max_over_ranks(int(error is not None), self.dist, self.device):  # also the barrier
            return path
        message = ckpt.save_failure_message(self.out_dir, self.step, error)
        if self.cfg.on_save_error == "continue":
            self.log(f"{message} Training goes on (train.on_save_error=continue); the next save tries again.")
            return None
        raise CogniError(message)

    def resume(self, path: str | Path | None = None) -> Path:
        """Continue from a checkpoint (default: this run's latest): weights, optimizer, data and RNG."""
        where = ckpt.find_checkpoint(path or self.out_dir)
        ckpt.load_weights(self.raw_model, where, "cpu" if self.fsdp else self.device)  # FSDP shards from the CPU
        state = ckpt.load_train_state(where)
        if self.fsdp:
            load_full_optimizer_state(self.raw_model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        if not load_scaler_state(self.scaler, state["scaler"]) and self.scaler.is_enabled():
            self.log(f"note: {where.name} has no fp16 loss scale (a bf16 or fp32 run); starting from a fresh one")
        for key in ("step", "tokens_seen", "best_val_loss", "lr_scale", "bad_steps", "rollbacks"):
            setattr(self, key, state[key])
        if self.cfg.max_minutes is not None and "total_steps" in state:  # the plan fitted to the clock so far
            fitted = max(self.step, int(state["total_steps"]))
            self.total_steps = fitted if self.step_limit is None else min(fitted, self.step_limit)
        ranks = state["ranks"]
        if len(ranks) != self.dist.world_size:
            self.log(f"note: resuming with {self.dist.world_size} processes instead of {len(ranks)}; "
                     "the data order will differ from an uninterrupted run.")
        mine = ranks[self.dist.rank % len(ranks)]
        if mine["loader"] is not None and hasattr(self.train_batches, "load_state_dict"):
            self.train_batches.load_state_dict(mine["loader"])
            self._iter = iter(self.train_batches)
        set_rng_state(mine["rng"])
        if self.dist.is_main:
            self.metrics.truncate_after(self.step)
        barrier(self.dist)
        self.log(f"resumed from {where} at step {self.step}")
        return where

    # --- the loop ---------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run until the step budget, a signal, or the time budget; save and return a summary.

        One pass of the loop is one optimizer step (its lr from the schedule), its log record, then
        the decisions: evaluate?, save?, stop? The stop reason is agreed by all ranks, so every rank
        stops, and saves, at the same step."""
        start, first_step, stopped = time.time(), self.step, "finished"
        budget_s = 60 * self.cfg.max_minutes if self.cfg.max_minutes is not None else None
        self._preflight()  # before the progress bar, so a refusal is the only thing printed
        with self._session() as (bar, signals):
            while self.step < self.total_steps:
                out = self._guarded_step()  # lr, forward/backward, clip, update; non-finite and OOM guards
                self._record_step(out, bar)  # metrics.jsonl (and trackers), progress bar
                elapsed = time.time() - start
                over_time = budget_s is not None and elapsed > budget_s
                # Every rank stops at this same step, for the same reason, even if only one got the signal.
                stop = STOP_REASONS[max_over_ranks(stop_wish(signals.requested, over_time), self.dist, self.device)]
                at_eval = out.applied and self.step % self.cfg.eval_interval == 0
                if at_eval and budget_s is not None:  # re-fit the schedule so its decay ends with the time
                    self._fit_schedule(elapsed, self.step - first_step, budget_s, bar)
                epoch_end = out.applied and bool(self.steps_per_epoch) and self.step % self.steps_per_epoch == 0
                last = out.applied and self.step >= self.total_steps
                improved = self._eval_and_plot() if at_eval or epoch_end or last else False
                periodic = out.applied and self.step % self.cfg.save_interval == 0
                if stop or last or epoch_end or improved or periodic:
                    self.save(epoch_end=epoch_end, best=improved)
                if stop:
                    stopped = stop
                    break
        return TrainResult(self.step, self.best_val_loss, self.tokens_seen, time.time() - start, self.bad_steps,
                           stopped)

    # --- the pieces the loop calls ----------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self) -> Iterator[tuple[Any, StopSignals]]:
        """The progress bar, the experiment trackers and the signal handlers, for the length of a run."""
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        trackers = (Trackers(self.cfg.log_to, self.out_dir, to_dict(self.config))
                    if self.dist.is_main and self.cfg.log_to else None)
        self.metrics.sinks = [trackers] if trackers else []
        self.raw_model.train()
        try:
            with StopSignals(self.log) as signals:
                yield bar, signals
        finally:
            bar.close()
            if trackers:
                trackers.close()
            self.metrics.sinks = []

    def _guarded_step(self) -> StepOutcome:
        """train_step with out-of-memory turned into advice, and non-finite steps counted: after
        `max_bad_steps` of them in a row, the last checkpoint is reloaded at half the LR (`roll_back`)."""
        try:
            out = self.train_step()
        except RuntimeError as e:  # torch.OutOfMemoryError (CUDA) is a RuntimeError too
            if not is_out_of_memory(e):
                raise
            self.optimizer.zero_grad(set_to_none=True)
            raise CogniError(oom_advice(self._micro_shape, self.cfg, self.precision, self.dist.world_size)) from None
        if out.applied:
            self.bad_streak = 0
        elif out.reason != "scaler_skip":
            self.bad_steps += 1
            self.bad_streak += 1
            self.log(f"warning: step {self.step + 1} skipped ({out.reason.replace('_', ' ')}); "
                     f"{self.bad_steps} so far")
            if self.bad_streak >= self.cfg.max_bad_steps:
                roll_back(self)
        return out

    def _record_step(self, out: StepOutcome, bar: Any) -> None:
        """The step's metrics.jsonl record (rank 0), and the progress bar every log_interval steps."""
        if not self.dist.is_main:
            return
        if not out.applied:
            self.metrics.write({"step": self.step, "skipped": out.reason, "bad_steps": self.bad_steps})
            return
        tok_s = out.tokens / max(out.seconds, 1e-9)
        rec = {"step": self.step, "epoch": self.epoch, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm,
               "tokens_per_s": round(tok_s, 1), "tokens_seen": self.tokens_seen}
        if self.peak_flops:
            seq_len = out.tokens // max(1, self.cfg.grad_accum * self.cfg.batch_size * self.dist.world_size)
            flops = flops_per_token(self.raw_model.config, seq_len)[1]
            rec["mfu"] = round(flops * tok_s / (self.peak_flops * self.dist.world_size), 4)
        self.metrics.write(rec)
        bar.update(1)
        if self.step % self.cfg.log_interval == 0 or self.step == 1:
            bar.set_postfix(epoch=self.epoch + 1, loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}",
                            tok_s=f"{tok_s:,.0f}", refresh=False)

    def _fit_schedule(self, elapsed: float, steps_taken: int, budget_s: float, bar: Any) -> None:
        """Fit the schedule to end with the time budget (the smallest fit over ranks): shorter, or, for a
        warmup-stable-decay schedule whose decay has not begun, longer too (up to train.max_steps)."""
        may_grow = self.cfg.schedule == "wsd" and self.step < wsd_decay_start(self.cfg, self.total_steps)
        fit = min_over_ranks(fit_to_budget(self.step, steps_taken, elapsed, budget_s, self.total_steps,
                                           may_grow=may_grow, limit=self.step_limit), self.dist, self.device)
        if fit != self.total_steps:
            self.total_steps = fit
            bar.total = fit
            bar.refresh()

    def _eval_and_plot(self) -> bool:
        """Evaluate, log, redraw the loss curve; True when the val loss is a new best."""
        val = self.evaluate()
        if val is None:
            return False
        improved = self.best_val_loss is None or val < self.best_val_loss
        if improved:
            self.best_val_loss = val
        if self.dist.is_main:
            self.metrics.write({"step": self.step, "epoch": self.epoch, "val_loss": val,
                                "val_ppl": math.exp(min(val, 50.0))})
            plot_losses(self.metrics.train, self.metrics.val, self.out_dir / "loss.png")
            self.log(f"step {self.step}: val loss {val:.4f}{' (best)' if improved else ''}")
        return improved

    def _preflight(self) -> None:
        """Disk for the checkpoints and memory for the step, before the first step; a refusal on any rank
        stops every rank (the check itself: train/preflight.py)."""
        warnings, refusal = preflight_findings(self.raw_model, self.optimizer, self.cfg, self.config.data.seq_len,
                                               self.precision, self.dist.world_size if self.fsdp else 1,
                                               self.out_dir, self.device, force=self.force)
        for w in warnings:
            self.log(w)  # rank 0 only
        if max_over_ranks(int(refusal is not None), self.dist, self.device):
            raise CogniError(refusal or "Another rank's pre-flight check refused this run; see its message.")
