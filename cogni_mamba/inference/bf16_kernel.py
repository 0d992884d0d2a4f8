"""Our bf16 product for CPUs with AVX512-BF16 (`kernels/bf16_linear.cpp`), built once at first use.

Why our own: oneDNN's bf16 product, even on weights it reordered ahead of time (`precision.PackedLinear`), pays
~30-40 us a call on the matrix-vector products of a decode step: 37 against 7 us (256 -> 384), 55 against 17 us
(256 -> 1536), 100 against 57 us (768 -> 2304), one thread (benchmarks/RESULTS.md, session 6). This kernel stores
each weight matrix once in the order it reads it (as the int8 kernel does) and sums each row in a fixed order, so a
row's result does not depend on its batch. Same inputs as oneDNN's (bf16 activations and weights, fp32 sums, a bf16
result); only the order of the sums differs. Decode steps (up to `max_rows` rows) take it; a prompt's larger
products stay with oneDNN, which is faster at many rows.

`available()`: an x86 CPU with AVX512-BF16, a C++ compiler and ninja; anything else keeps oneDNN's product, with
one warning where the CPU could have run it. `COGNI_MAMBA_BF16=onednn` keeps oneDNN's product everywhere.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from ..device import cpu_flags
from .kernel_build import build, env_override, usable

CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16")
# Rows up to which a product takes this kernel; more take oneDNN's, faster there. One thread, ours against oneDNN
# at 1 / 4 / 8 / 16 rows: 256 -> 1536 2.7x / 2.0x / 2.1x / 1.4x; 768 -> 2304 1.6x / 1.3x / 1.4x / 1.1x; a
# 768 -> 50304 head 1.8x / 1.1x / 0.86x / 0.93x, so matrices of LARGE weights or more stop at LARGE_MAX_ROWS.
# On CPUs with AMX, oneDNN's bf16 product runs on the matrix units: there (not measured yet) only products of up to
# AMX_MAX_ROWS rows take ours, whose gain is the call overhead it saves.
MAX_ROWS, LARGE, LARGE_MAX_ROWS, AMX_MAX_ROWS = 16, 2**24, 4, 4


def max_rows(out_features: int, in_features: int) -> int:
    """The most rows for which a product of this shape takes the kernel."""
    if out_features * in_features >= LARGE:
        return LARGE_MAX_ROWS
    return AMX_MAX_ROWS if "amx_bf16" in cpu_flags() else MAX_ROWS


def wanted() -> bool:
    """False when the user asked for oneDNN's product (COGNI_MAMBA_BF16=onednn)."""
    return os.environ.get("COGNI_MAMBA_BF16", "").strip().lower() != "onednn"


def onednn_instead(active: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within it (when `active`), bf16 layers made keep oneDNN's product, as under COGNI_MAMBA_BF16=onednn."""
    return env_override("COGNI_MAMBA_BF16", "onednn", active)


def cpu_supports() -> bool:
    return cpu_flags().issuperset(CPU_FLAGS)


@functools.cache
def why_unavailable() -> str | None:
    """None when the kernel is built and loaded (building it the first time); else why not, in a phrase."""
    if not cpu_supports():
        return "this CPU has no AVX512-BF16"
    return build("cogni_mamba_bf16", "bf16_linear.cpp", ["-mavx512bf16"], op="cogni_mamba_bf16::bf16_linear",
                 shape=_shape_only)


def _shape_only(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The op's result without computing it: what torch.export needs to trace the compiled step's calls."""
    return x.new_empty(x.shape[0], out_features)


def available() -> bool:
    """Whether bf16 decode products run on this kernel (building it if needed); warns once when a CPU that could
    run it cannot."""
    return usable(wanted(), why_unavailable, cpu_supports, _warn_once)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"bf16 decode steps run oneDNN's product, not ours: {reason}.", stacklevel=3)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """bf16 rows `weight` (N, K), K even, as (N/16, K/2, 16, 2) with zero padding: the order the kernel reads."""
    n, k = weight.shape
    n_pad = -(-n // 16) * 16
    padded = torch.zeros(n_pad, k, dtype=torch.bfloat16, device=weight.device)
    padded[:n] = weight
    return padded.view(n_pad // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """x (M, K) bf16 @ the packed weights' (n, K).T: (M, n) bf16, summed in fp32."""
    return torch.ops.cogni_mamba_bf16.bf16_linear(x, packed, n)
