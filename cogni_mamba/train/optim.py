"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (every matrix: linear weights and the embedding) and an
    undecayed one (vectors: the RMSNorm gains).

    Decaying a norm gain pulls it towards zero, which only shrinks activations; matrices are where the
    capacity lives, so they are the ones regularised (as in GPT-2 / nanoGPT / Llama training).
    A tied embedding/head weight appears once (`named_parameters` de-duplicates shared tensors).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with the fused kernel on CUDA and the foreach one elsewhere."""
    fused = device_type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
        fused=fused or None, foreach=None if fused else True,
    )


def lr_at(step: int, cfg: TrainConfig, total_steps: int, scale: float = 1.0) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr over `warmup_steps` steps, then a cosine from lr down to
    min_lr at `total_steps`, and min_lr after that. `scale` lowers both ends (used after a rollback).
    """
    if step < cfg.warmup_steps:
        return scale * cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return scale * (cfg.min_lr + cosine * (cfg.lr - cfg.min_lr))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write one learning rate into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
