"""Training feedback: metrics.jsonl, the loss-curve PNG, and the FLOP / MFU estimate."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..errors import CogniError
from ..files import write_file_atomically, write_text_atomically

# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) from NVIDIA's datasheets, by the part's name.
# The first key found in the device name wins, so the specific variants come before the family.
PEAK_FLOPS = {
    "GH200": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("H100 80GB HBM3"); PCIe and NVL parts are told apart below when unnamed
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}
H100_PCIE_SMS = 114  # the PCIe part has 114 SMs; SXM and NVL have 132
H100_NVL_MIN_BYTES = 90 * 1024**3  # NVL: 94 GB; SXM and PCIe: 80 GB


def peak_flops_for(name: str, total_memory: int = 0, sm_count: int = 0) -> float | None:
    """Dense bf16 peak of the GPU called `name`; an "H100" without its variant in the name is the
    PCIe part when it has 114 SMs, the NVL part when it has over 90 GiB, else the SXM part."""
    if "H100" in name and not any(k in name for k in ("PCIe", "NVL", "GH200")):
        if sm_count == H100_PCIE_SMS:
            return PEAK_FLOPS["H100 PCIe"]
        if total_memory > H100_NVL_MIN_BYTES:
            return PEAK_FLOPS["H100 NVL"]
    for key, peak in PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def device_peak_flops(device: torch.device) -> float | None:
    """The GPU's dense bf16 peak when we know its name; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return peak_flops_for(props.name, props.total_memory, props.multi_processor_count)


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and keeps the loss history for the plot."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []
        self.sinks: list[Any] = []  # experiment trackers (train/tracking.py): each gets every record too

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after `step` (written by a run that died after its last checkpoint)."""
        records = [r for r in self.read() if int(r.get("step", 0)) <= step]
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in records))
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
        """Append one record (flushed so a kill loses at most the line being written).

        A write that fails (disk full) is undone, so the file never keeps half a line, and reported
        as a CogniError: the run stops there, its last checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            size = f.tell()
            try:
                f.write(line)
                f.flush()
            except OSError as e:
                with contextlib.suppress(OSError):
                    f.truncate(size)
                raise CogniError(f"Could not write {self.path} ({e.strerror or e}); free some space and continue "
                                 "the run with --resume.") from None
        self._remember(record)
        for sink in self.sinks:
            sink.log(record)

    def _remember(self, r: dict[str, Any]) -> None:
        if "loss" in r and _finite(r["loss"]):
            self.train.append((int(r["step"]), float(r["loss"])))
        if "val_loss" in r and _finite(r["val_loss"]):
            self.val.append((int(r["step"]), float(r["val_loss"])))


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def plot_losses(train: list[tuple[int, float]], val: list[tuple[int, float]], path: str | Path) -> None:
    """Write the train/val loss curves to a PNG (atomically, so a viewer never sees half a file).

    Without matplotlib (a bare GPU image) there is no plot; metrics.jsonl holds the same numbers."""
    try:
        import matplotlib
    except ImportError:
        return

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
    try:
        write_file_atomically(Path(path), lambda tmp: fig.savefig(tmp, format="png"), fsync=False)
    except OSError:  # disk full: keep the previous plot; metrics.jsonl has the numbers
        pass
    finally:
        plt.close(fig)
