"""Pre-flight: will this run's checkpoints fit on the disk, and its training step in memory?

Checked before the first step (of `train`, `finetune` and the demo, all through `Trainer.train`), so
a run that cannot finish says so in one sentence instead of failing at its first save, or being
killed by the operating system, after it has spent its time. Estimates, not guarantees: a run over
`WARN_SHARE` of what is free gets a warning; one over all of it is refused (`force=True` turns the
refusal into a warning).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import TrainConfig
from ..device import free_memory
from ..stats import human_bytes, train_memory

WARN_SHARE = 0.8
SLACK_BYTES = 4 * 1024**2  # config, tokenizer, RNG and loader state


def checkpoint_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of one checkpoint: the weights as stored plus the optimizer's per-parameter state
    (AdamW: two moments; Muon: one momentum buffer), counted from the parameters' sizes."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    state = 0
    for group in optimizer.param_groups:
        buffers = 1 if "ns_coefficients" in group else 2  # Muon's momentum, or AdamW's two moments
        state += sum(buffers * p.numel() * 4 for p in group["params"])
    return weights + state + SLACK_BYTES


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def _level(need: int, free: int) -> int:
    """2: more than is free (refuse), 1: more than WARN_SHARE of it (warn), 0: fine."""
    return 2 if need > free else int(need > WARN_SHARE * free)


def check(*, out_dir: Path, one_checkpoint: int, keep: int, memory_needed: int, device: torch.device,
          force: bool) -> tuple[list[str], str | None]:
    """(warnings, refusal or None) for a run; a refusal becomes a warning with `force`."""
    disk, mem = free_disk(out_dir), free_memory(device)
    need = one_checkpoint * (keep + 1)  # the kept ones, plus the one being written before pruning
    where = "GPU memory" if device.type == "cuda" else "RAM"
    disk_level, mem_level = _level(need, disk), _level(memory_needed, mem)
    disk_refusal = (f"This run's checkpoints need about {human_bytes(need)} at {out_dir} ({human_bytes(one_checkpoint)} "
                    f"each; train.keep_last={keep} kept plus one being written) but only {human_bytes(disk)} is "
                    "free; free some space, lower train.keep_last, choose another --out, or pass --force to start "
                    "anyway.") if disk_level == 2 else None
    memory_refusal = (f"Training this model needs about {human_bytes(memory_needed)} of {where} (estimated) but only "
                      f"{human_bytes(mem)} is free; lower train.batch_size or data.seq_len, pick a smaller preset, "
                      "or pass --force to start anyway.") if mem_level == 2 else None
    warnings = []
    if disk_level == 1:
        warnings.append(f"warning: this run's checkpoints need about {human_bytes(need)} of the {human_bytes(disk)} "
                        f"free at {out_dir}; the disk may fill up.")
    if mem_level == 1 or (disk_refusal and memory_refusal):  # one refusal is told; the second one warns
        warnings.append(f"warning: training needs about {human_bytes(memory_needed)} of the {human_bytes(mem)} of "
                        f"{where} free; the run may run out of memory.")
    refusal = disk_refusal or memory_refusal
    if refusal is not None and force:
        warnings.append(f"warning (--force): {refusal}")
        refusal = None
    return warnings, refusal


def run_memory(model_cfg, batch: int, seq_len: int, precision: str) -> int:
    return train_memory(model_cfg, batch, seq_len, mixed=precision in ("bf16", "fp16")).total


def preflight_findings(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, seq_len: int,
                       precision: str, shards: int, out_dir: Path, device: torch.device, *,
                       force: bool) -> tuple[list[str], str | None]:
    """`check` for a trainer's model and optimizer: one checkpoint's bytes, and the step's memory
    (divided among `shards` FSDP ranks)."""
    memory = run_memory(model.config, cfg.batch_size, seq_len, precision) // shards
    return check(out_dir=out_dir, one_checkpoint=checkpoint_bytes(model, optimizer), keep=cfg.keep_last,
                 memory_needed=memory, device=device, force=force)
