"""Optimizers (AdamW, or Muon for the hidden matrices with AdamW for the rest) and the learning-rate
schedules (warmup + cosine, or warmup-stable-decay).

Muon (`torch.optim.Muon`) replaces each hidden matrix's momentum update by its nearest semi-orthogonal
matrix (a few Newton-Schulz iterations), which trains transformer blocks in fewer tokens than AdamW.
It only makes sense for 2-D weights inside the blocks: the embedding (tied to the head here) and the
RMSNorm gains stay with AdamW. Both share one learning rate: Muon's step is scaled to AdamW's
update size (`adjust_lr_fn="match_rms_adamw"`), so one schedule and one `train.lr` drive both.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import CogniError


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


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """The weights Muon trains: 2-D matrices inside the transformer blocks (not the embedding / head)."""
    return p.dim() == 2 and ".layers." in f".{name}"


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer object over two algorithms: torch's Muon for the hidden matrices, AdamW for the rest.

    It is a real `torch.optim.Optimizer` whose `param_groups` and `state` are shared with the two
    inner optimizers, so the trainer, GradScaler, checkpoints and FSDP's state-dict helpers treat it
    like any other optimizer (groups are numbered Muon's first, then AdamW's).
    """

    def __init__(self, muon_params: list[nn.Parameter], adamw_groups: list[dict], *, lr: float,
                 weight_decay: float, momentum: float, betas: tuple[float, float], eps: float = 1e-8,
                 fused: bool = False):
        if not hasattr(torch.optim, "Muon"):
            raise CogniError(f"train.optimizer=muon needs torch.optim.Muon (torch 2.9 or newer; this is "
                             f"{torch.__version__}); upgrade torch or use train.optimizer=adamw.")
        self._muon = torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=True, adjust_lr_fn="match_rms_adamw")
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                                        foreach=None if fused else True)
        super().__init__([p for g in self._inner_groups() for p in g["params"]], {"lr": lr})
        self.param_groups = self._inner_groups()
        self._link()

    def _inner_groups(self) -> list[dict]:
        return [*self._muon.param_groups, *self._adamw.param_groups]

    def _link(self) -> None:
        """Make the inner optimizers use this object's group dicts and state (after init or a load)."""
        n = len(self._muon.param_groups)
        self._muon.param_groups, self._adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self._muon.state = self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        self._adamw.step()
        return loss


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names: AdamW over `param_groups` (fused on CUDA, foreach
    elsewhere), or `MuonAdamW` with Muon on the hidden matrices."""
    fused = device_type == "cuda"
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=1e-8,
                                 fused=fused or None, foreach=None if fused else True)
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_hidden_matrix(name, p):
            muon.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    adamw_groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return MuonAdamW(muon, [g for g in adamw_groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay,
                     momentum=cfg.muon_momentum, betas=betas, fused=fused)


def wsd_decay_start(cfg: TrainConfig, total_steps: int) -> int:
    """The first step of the warmup-stable-decay schedule's decay: the last `decay_fraction` of the steps."""
    return max(cfg.warmup_steps, total_steps - max(1, round(cfg.decay_fraction * total_steps)))


def lr_at(step: int, cfg: TrainConfig, total_steps: int, scale: float = 1.0) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr over `warmup_steps` steps; then, for `schedule="cosine"`, a
    cosine from lr down to min_lr at `total_steps`; for `"wsd"`, lr held until the last
    `decay_fraction` of `total_steps`, then a linear decay to min_lr at `total_steps`. min_lr after
    that. `scale` lowers both ends (used after a rollback). With a time budget the trainer re-fits
    `total_steps` to the pace so far, so the WSD decay starts when the remaining time says so.
    """
    if step < cfg.warmup_steps:
        return scale * cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start = wsd_decay_start(cfg, total_steps)
        if step < decay_start:
            return scale * cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return scale * (cfg.lr + progress * (cfg.min_lr - cfg.lr))
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return scale * (cfg.min_lr + cosine * (cfg.lr - cfg.min_lr))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write one learning rate into every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
