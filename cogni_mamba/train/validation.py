"""The validation loss during training: the fixed held-out batches, split across ranks, run eagerly."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .distributed import DistInfo, all_reduce_sum, is_sharded
from .precision import autocast


def eager() -> contextlib.AbstractContextManager:
    """Within it, torch.compile'd code runs eagerly (no compilation); torch < 2.6 lacks the switch."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@torch.no_grad()
def validation_loss(model: nn.Module, batches: list, precision: str, device: torch.device, dist: DistInfo) -> float:
    """Mean loss of `model` (the unwrapped one) over `batches`, each rank taking every world_size-th.

    It runs eagerly, also for compiled blocks: a compiled model in eval mode and without gradients
    would be compiled once more, inside the run's time. The model is back in train mode afterwards.
    """
    sharded = is_sharded(model)
    model.eval()
    total = torch.zeros(2, device=device)  # (sum of batch losses, number of batches)
    mine = batches[dist.rank::dist.world_size]
    # FSDP all-gathers weights inside forward, so every rank must run as many forwards: the ranks
    # with one batch fewer repeat a batch and give it weight 0.
    rounds = -(-len(batches) // dist.world_size) if sharded else len(mine)
    with eager():
        for i in range(rounds):
            x, y = mine[i] if i < len(mine) else batches[0]
            with autocast(precision, device):
                _, loss = model(x.to(device), y.to(device), return_logits=False)
            weight = torch.tensor(float(i < len(mine)), device=device)
            total += torch.stack([loss.float(), torch.ones((), device=device)]) * weight
    if sharded:  # without a backward the root keeps its gathered weights; the optimizer holds the shards
        model.reshard()
    model.train()
    total = all_reduce_sum(total, dist)
    return float(total[0] / total[1])
