"""The training loop: accumulation, mixed precision, evaluation, checkpoints, exact resume, faults.

`Trainer(model, train_batches, val_batches, cfg.train, ...)` takes any iterable of (x, y) batches;
when the iterable has `state_dict()` / `load_state_dict()` its position is saved in every
checkpoint, and `batches_per_epoch` (per process) lets the run count epochs. One optimizer step is
`grad_accum` micro-batches on each of `world_size` processes, whose model is wrapped in DDP or, with
`train.parallel = "fsdp"`, sharded by FSDP2 (checkpoints hold the full weights either way).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig, to_dict
from ..errors import CogniError
from ..stats import flops_per_token, human_bytes
from . import checkpoint as ckpt
from .distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    current,
    full_model_state,
    full_optimizer_state,
    gather_objects,
    grad_sync,
    load_full_optimizer_state,
    max_over_ranks,
    pick_device,
    shard_fsdp,
    wrap_ddp,
)
from .metrics import MetricsLog, device_peak_flops, plot_losses
from .optim import build_optimizer, lr_at, set_lr
from .precision import autocast, configure_matmul, load_scaler_state, make_scaler, resolve_precision
from .preflight import check as preflight_check
from .preflight import checkpoint_bytes, free_disk, run_memory
from .state import plain, rng_state, set_rng_state
from .tracking import Trackers

MAX_ROLLBACKS = 2


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


def is_out_of_memory(e: BaseException) -> bool:
    """True for an allocation failure: torch.OutOfMemoryError (CUDA) or the CPU/MPS allocators' RuntimeError."""
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "not enough memory" in text


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


def eager() -> contextlib.AbstractContextManager:
    """Within it, torch.compile'd code runs eagerly (no compilation); torch < 2.6 lacks the switch."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def steps_in_budget(budget_s: float, step_s: float, cfg: TrainConfig) -> int:
    """Optimizer steps that fit a time budget at `step_s` seconds a step, counting each evaluation
    (forward only: ~1/3 of a step per batch). The first plan; `fit_to_budget` corrects it as the run goes."""
    eval_s = cfg.eval_batches / 3 * step_s / cfg.grad_accum
    per_step = step_s + eval_s / cfg.eval_interval
    return max(1, int(budget_s / per_step))


def fit_to_budget(step: int, steps_taken: int, elapsed_s: float, budget_s: float, planned: int) -> int:
    """The step count that ends within the time budget at the pace so far, never more than planned.

    With a time budget the cosine schedule then reaches min_lr when the time runs out, instead of the
    run being cut off halfway down the schedule.
    """
    if steps_taken <= 0 or elapsed_s <= 0:
        return planned
    pace = elapsed_s / steps_taken  # seconds per step, evaluations and checkpoints included
    return max(step, min(planned, step + int((budget_s - elapsed_s) / pace)))


class Trainer:
    """Trains `model` on `train_batches`, evaluating on the fixed `val_batches`, writing to `out_dir`."""

    def __init__(self, model: nn.Module, train_batches: Iterable, val_batches: Iterable | None, cfg: TrainConfig, *,
                 config: Config | None = None, tokenizer: Any = None, out_dir: str | Path | None = None,
                 device: str | torch.device | None = None, dist: DistInfo | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None, force: bool = False):
        self.cfg = cfg
        self.force = force  # pre-flight refusals (disk, memory) become warnings
        self.dist = dist or current()
        self.device = torch.device(device) if device is not None else pick_device(None, self.dist.local_rank)
        self.fsdp = cfg.parallel == "fsdp" and (self.dist.enabled or torch.distributed.is_initialized())
        self.precision = resolve_precision(cfg.precision, self.device)
        if self.fsdp and self.precision == "fp16":
            raise CogniError("train.parallel=fsdp does not support fp16 (its loss scaler is per rank); "
                             "use --precision bf16 or fp32.")
        configure_matmul(self.precision, self.device)
        if self.fsdp:
            # fully_shard moves each shard to the device itself, so the whole model never has to fit there;
            # with compile, each block is compiled before it is sharded (FSDP2's recommended order).
            self.raw_model = shard_fsdp(model, self.dist, self.device, precision=self.precision, compile=cfg.compile)
            self.model = self.raw_model
        else:
            self.raw_model = model.to(self.device)
            # compile wraps DDP (not the other way round), so the graph splits at DDP's gradient buckets
            ddp = wrap_ddp(self.raw_model, self.dist, self.device)
            self.model = torch.compile(ddp) if cfg.compile else ddp
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
        self._stop = False
        self._micro_shape: tuple[int, ...] | None = None
        if self.dist.is_main:
            ckpt.remove_stale_temps(self.out_dir)

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

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed validation batches (split across ranks), or None without any.

        It runs the uncompiled model (eager, also for compiled blocks): a compiled model in eval mode
        and without gradients would be compiled once more, inside the run's time.
        """
        if not self.val_batches:
            return None
        with eager():
            return self._evaluate()

    def _evaluate(self) -> float:
        self.raw_model.eval()
        total = torch.zeros(2, device=self.device)  # (sum of batch losses, number of batches)
        mine = self.val_batches[self.dist.rank::self.dist.world_size]
        # FSDP all-gathers weights inside forward, so every rank must run as many forwards: the ranks
        # with one batch fewer repeat a batch and give it weight 0.
        rounds = -(-len(self.val_batches) // self.dist.world_size) if self.fsdp else len(mine)
        for i in range(rounds):
            x, y = mine[i] if i < len(mine) else self.val_batches[0]
            with autocast(self.precision, self.device):
                _, loss = self.raw_model(x.to(self.device), y.to(self.device), return_logits=False)
            weight = torch.tensor(float(i < len(mine)), device=self.device)
            total += torch.stack([loss.float(), torch.ones((), device=self.device)]) * weight
        if self.fsdp:  # without a backward the root keeps its gathered weights; the optimizer holds the shards
            self.raw_model.reshard()
        self.raw_model.train()
        total = all_reduce_sum(total, self.dist)
        return float(total[0] / total[1])

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
        message = self._save_failure(error)
        if self.cfg.on_save_error == "continue":
            self.log(f"{message} Training goes on (train.on_save_error=continue); the next save tries again.")
            return None
        raise CogniError(message)

    def _save_failure(self, error: OSError | None) -> str:
        """One sentence on a failed save: what happened, what is intact, how to go on."""
        if error is None:
            return f"Rank 0 could not save the checkpoint at step {self.step}; see its message."
        latest = ckpt.read_pointer(self.out_dir)
        reason = error.strerror or str(error)
        kept = (f"the last good checkpoint ({self.out_dir / latest}) is intact, so free some space and continue "
                "from it with --resume" if latest else "no earlier checkpoint exists, so free some space and start again")
        try:
            free = f", {human_bytes(free_disk(self.out_dir))} free"
        except OSError:
            free = ""
        return f"Could not save the checkpoint at step {self.step} in {self.out_dir} ({reason}{free}); {kept}."

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

    def _rollback(self) -> None:
        """After `max_bad_steps` non-finite steps in a row: reload the last checkpoint at half the LR."""
        msg = (f"{self.bad_streak} non-finite steps in a row at step {self.step}; lower train.lr, use "
               "--precision bf16 or fp32, or check the data for corrupt tokens.")
        if self.rollbacks >= MAX_ROLLBACKS:
            raise CogniError(f"Training diverged: {msg}")
        try:
            where = ckpt.find_checkpoint(self.out_dir)
        except ckpt.CheckpointError:
            raise CogniError(f"Training diverged before the first checkpoint: {msg}") from None
        streak, rollbacks, scale = self.bad_streak, self.rollbacks + 1, self.lr_scale * 0.5
        # Keep moving through the data rather than replaying the batches that went bad.
        get_loader = getattr(self.train_batches, "state_dict", None)
        loader_state = get_loader() if callable(get_loader) else None
        iterator = self._iter
        self.resume(where)
        if loader_state is not None:
            self.train_batches.load_state_dict(loader_state)
            self._iter = iter(self.train_batches)
        else:
            self._iter = iterator
        self.rollbacks, self.lr_scale, self.bad_streak = rollbacks, scale, 0
        self.log(f"warning: {streak} non-finite steps in a row; reloaded {where.name} with the LR scaled by {scale}")

    # --- the loop ---------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if self._stop:  # a second Ctrl-C: stop without saving
            raise KeyboardInterrupt
        self._stop = True
        self.log(f"received {signal.Signals(signum).name}: saving a checkpoint at the end of this step")

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    def _record_step(self, out: StepOutcome, bar: Any) -> None:
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
        if bar is not None:
            bar.update(1)
            if self.step % self.cfg.log_interval == 0 or self.step == 1:
                bar.set_postfix(epoch=self.epoch + 1, loss=f"{out.loss:.4f}", lr=f"{out.lr:.2e}",
                                tok_s=f"{tok_s:,.0f}", refresh=False)

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

    def train(self) -> TrainResult:
        """Run until the step budget, a signal, or the time budget; save and return a summary."""
        from tqdm import tqdm

        start, first_step = time.time(), self.step
        budget_s = 60 * self.cfg.max_minutes if self.cfg.max_minutes is not None else None
        stopped = "finished"
        self._preflight()  # before the progress bar, so a refusal is the only thing printed
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not self.progress)
        trackers = (Trackers(self.cfg.log_to, self.out_dir, to_dict(self.config))
                    if self.dist.is_main and self.cfg.log_to else None)
        self.metrics.sinks = [trackers] if trackers else []
        self.raw_model.train()
        try:
            with self._signals():
                while self.step < self.total_steps:
                    out = self._guarded_step()
                    self._record_step(out, bar)
                    elapsed = time.time() - start
                    over_time = budget_s is not None and elapsed > budget_s
                    # 2: a signal reached some rank, 1: out of time. Every rank stops at this same step even
                    # when the signal reached only one of them, and all name the same reason.
                    stop = max_over_ranks(2 if self._stop else int(over_time), self.dist, self.device)
                    saved = False
                    if out.applied:
                        if budget_s is not None and self.step % self.cfg.eval_interval == 0:
                            self._fit_schedule(elapsed, self.step - first_step, budget_s, bar)
                        epoch_end = bool(self.steps_per_epoch) and self.step % self.steps_per_epoch == 0
                        last = self.step >= self.total_steps
                        improved = False
                        if self.step % self.cfg.eval_interval == 0 or epoch_end or last:
                            improved = self._eval_and_plot()
                        if stop or last or epoch_end or improved or self.step % self.cfg.save_interval == 0:
                            self.save(epoch_end=epoch_end, best=improved)
                            saved = True
                    if stop:
                        if not saved:
                            self.save()
                        stopped = "signal" if stop == 2 else "time"
                        break
        finally:
            bar.close()
            if trackers:
                trackers.close()
            self.metrics.sinks = []
        return TrainResult(self.step, self.best_val_loss, self.tokens_seen, time.time() - start, self.bad_steps,
                           stopped)

    def _preflight(self) -> None:
        """Disk for the checkpoints and memory for the step, before the first step (see train/preflight.py)."""
        one = checkpoint_bytes(self.raw_model, self.optimizer)
        memory = run_memory(self.raw_model.config, self.cfg.batch_size, self.config.data.seq_len, self.precision)
        if self.fsdp:
            memory //= self.dist.world_size
        warnings, refusal = preflight_check(out_dir=self.out_dir, one_checkpoint=one, keep=self.cfg.keep_last,
                                            memory_needed=memory, device=self.device, force=self.force)
        if self.dist.is_main:
            for w in warnings:
                self.log(w)
        if max_over_ranks(int(refusal is not None), self.dist, self.device):
            raise CogniError(refusal or "Another rank's pre-flight check refused this run; see its message.")

    def _fit_schedule(self, elapsed: float, steps_taken: int, budget_s: float, bar: Any) -> None:
        """Shorten the schedule so it ends within the time budget (the same on every rank)."""
        fit = fit_to_budget(self.step, steps_taken, elapsed, budget_s, self.total_steps)
        fit = -max_over_ranks(-fit, self.dist, self.device)  # the smallest over ranks
        if fit < self.total_steps:
            self.total_steps = fit
            bar.total = fit
            bar.refresh()

    def _guarded_step(self) -> StepOutcome:
        """train_step with out-of-memory turned into advice and non-finite steps counted."""
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
                self._rollback()
        return out
