"""Training feedback: metrics.jsonl, the loss-curve PNG, and the FLOP / MFU estimate."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) of GPUs we can name from their device string.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12 * L * T * dim.

    The tied embedding counts once; its lookup is free but the same matrix is the LM head's matmul.
    """
    return 6.0 * n_params + 12.0 * cfg.n_layers * seq_len * cfg.dim


def device_peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak when we know its name; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and keeps the loss history for the plot."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (written by a run that died after its last checkpoint)."""
        records = [r for r in self.read() if int(r.get("step", 0)) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)
        self.train.clear()
        self.val.clear()
        for r in records:
            self._remember(r)

    def read(self) -> list[dict[str, Any]]:
        """All complete records in the file (a torn last line from a kill is ignored)."""
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed so a kill loses at most the line being written)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        self._remember(record)

    def _remember(self, r: dict[str, Any]) -> None:
        if "loss" in r and _finite(r["loss"]):
            self.train.append((int(r["step"]), float(r["loss"])))
        if "val_loss" in r and _finite(r["val_loss"]):
            self.val.append((int(r["step"]), float(r["val_loss"])))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: str | Path) -> None:
    """Write the train/val loss curves to a PNG (atomically, so a viewer never sees half a file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val, strict=True), label="val", marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(".tmp-" + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
