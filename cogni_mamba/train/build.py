"""Putting a model to work: the one place that places, wraps and compiles it before a Trainer takes it.

`build_trainer(...)` is what the `train` and `finetune` commands, the demo and the benchmarks call;
`pretraining_inputs(cfg)` is the model and token batches that `train` and the demo pretrain.
Its side effects, in order: the device (this rank's GPU unless told), the matmul precision (TF32 for
fp32 on CUDA), the model on the device and wrapped in DDP, or sharded by FSDP2, compiled when asked,
and the temp folders of a save that was killed removed from the run folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig
from ..errors import CogniError
from . import checkpoint as ckpt
from .distributed import DistInfo, current, pick_device, shard_fsdp, wrap_ddp
from .precision import configure_matmul, resolve_precision
from .trainer import Trainer


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device, dist: DistInfo
                  ) -> tuple[nn.Module, nn.Module]:
    """(the model to optimize, the module a step calls): on `device`, wrapped in DDP or sharded by FSDP2
    as `cfg.parallel` says when there is a process group, and compiled when `cfg.compile`."""
    precision = resolve_precision(cfg.precision, device)
    fsdp = cfg.parallel == "fsdp" and (dist.enabled or torch.distributed.is_initialized())
    if fsdp and precision == "fp16":
        raise CogniError("train.parallel=fsdp does not support fp16 (its loss scaler is per rank); "
                         "use --precision bf16 or fp32.")
    configure_matmul(precision, device)
    if fsdp:
        # fully_shard moves each shard to the device itself, so the whole model never has to fit there;
        # with compile, each block is compiled before it is sharded (FSDP2's recommended order).
        sharded = shard_fsdp(model, dist, device, precision=precision, compile=cfg.compile)
        return sharded, sharded
    placed = model.to(device)
    # compile wraps DDP (not the other way round), so the graph splits at DDP's gradient buckets
    ddp = wrap_ddp(placed, dist, device)
    return placed, torch.compile(ddp) if cfg.compile else ddp


def build_trainer(model: nn.Module, train_batches: Iterable, val_batches: Iterable | None, cfg: TrainConfig, *,
                  config: Config | None = None, tokenizer: Any = None, out_dir: str | Path | None = None,
                  device: str | torch.device | None = None, dist: DistInfo | None = None, progress: bool = True,
                  log: Callable[[str], None] | None = None, force: bool = False) -> Trainer:
    """A Trainer for `model` (see the module doc for what is done to it first); the arguments are the
    Trainer's, and `device` defaults to this rank's GPU when there is one, else the CPU."""
    dist = dist or current()
    device = torch.device(device) if device is not None else pick_device(None, dist.local_rank)
    model, forward = prepare_model(model, cfg, device, dist)
    out = Path(out_dir or cfg.out_dir)
    if dist.is_main:
        ckpt.remove_stale_temps(out)
    return Trainer(model, train_batches, val_batches, cfg, forward=forward, config=config, tokenizer=tokenizer,
                   out_dir=out, device=device, dist=dist, progress=progress, log=log, force=force)


def pretraining_inputs(cfg: Config, dist: DistInfo | None = None) -> tuple[nn.Module, Iterable, list]:
    """(model, train batches, validation batches) for pretraining on `cfg.data`'s token shards: a new
    model from `train.seed` (the same initial weights on every rank), this rank's share of the
    training windows, and `train.eval_batches` fixed validation batches."""
    from ..data import TokenBatches, fixed_batches
    from ..model import CogniMamba

    dist = dist or current()
    torch.manual_seed(cfg.train.seed)
    model = CogniMamba(cfg.model)
    d, T, B = cfg.data, cfg.data.seq_len, cfg.train.batch_size
    batches = TokenBatches(d.data_dirs, T, B, weights=d.weights or None, seed=d.seed, rank=dist.rank,
                           world_size=dist.world_size)
    return model, batches, fixed_batches(d.data_dirs, T, B, cfg.train.eval_batches)
