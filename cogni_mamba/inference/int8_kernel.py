"""Our int8 x fp32 product for CPUs with AVX512-VNNI (`kernels/int8_linear.cpp`), built once at first use.

Why our own: fbgemm's dynamic int8 linear, the product torch offers, pays ~20 us a call before any work (5x
a nano-sized product in cache) and reads a matrix too big for the cache at about half the memory speed one
core reaches on a sequential stream. This kernel stores each weight matrix once in the order it reads it,
so a matrix-vector product is one sequential pass over the weights; measured in benchmarks/RESULTS.md
("An int8 kernel of our own"). It also quantizes each activation row on its own, to 8 bits over the row's
range [min(x, 0), max(x, 0)] (fbgemm does the same over a whole input), so a row's result does not depend on its
batch, and a prompt's tokens do not share one scale: on the demo checkpoint the eval loss moves +0.0001 from fp32
with it and +0.0015 with fbgemm.

`available()` says whether this machine runs it: an x86 CPU with AVX512-VNNI, a C++ compiler and ninja
(`pip install ninja`); the build takes ~10 s once and is cached by torch.utils.cpp_extension (under
~/.cache/torch_extensions). Anything else falls back to fbgemm, with one warning where the CPU could have run it.
`COGNI_MAMBA_INT8=fbgemm` forces the fallback.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from ..device import cpu_flags
from .kernel_build import build, env_override, usable

CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def wanted() -> bool:
    """False when the user asked for fbgemm's product (COGNI_MAMBA_INT8=fbgemm)."""
    return os.environ.get("COGNI_MAMBA_INT8", "").strip().lower() != "fbgemm"


def fbgemm_instead(active: bool = True) -> contextlib.AbstractContextManager[None]:
    """Within it (when `active`), int8 layers made take fbgemm's product, as under COGNI_MAMBA_INT8=fbgemm; the
    variable is restored after (benchmarks compare the two in one process)."""
    return env_override("COGNI_MAMBA_INT8", "fbgemm", active)


def cpu_supports() -> bool:
    """Whether this CPU has the AVX512 subsets the kernel is compiled for."""
    return cpu_flags().issuperset(CPU_FLAGS)


@functools.cache
def why_unavailable() -> str | None:
    """None when the kernel is built and loaded (building it the first time); else why not, in a phrase."""
    if not cpu_supports():
        return "this CPU has no AVX512-VNNI"
    return build("cogni_mamba_int8", "int8_linear.cpp", ["-mavx512vnni"], op="cogni_mamba::int8_linear",
                 shape=_shape_only)


def _shape_only(x: torch.Tensor, packed: torch.Tensor, row_sums: torch.Tensor, scale: torch.Tensor,
                out_features: int) -> torch.Tensor:
    """The op's result without computing it: what torch.export needs to trace the compiled step's calls."""
    return x.new_empty(x.shape[0], out_features)


def available() -> bool:
    """Whether int8 products run on this kernel (building it if needed); warns once when a CPU that could run it
    cannot (a CPU without VNNI falls back to fbgemm quietly: nothing to do about it)."""
    return usable(wanted(), why_unavailable, cpu_supports, _warn_once)


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"int8 runs fbgemm's product, not ours: {reason}.", stacklevel=3)


def pack(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed, row_sums, scale) for int8 rows `weight` (N, K) with per-row `scale` (N,): the weights as
    (N/16, K/4, 16, 4) with zero padding, each padded row's weight sum (int32) and its scale (fp32, 0 in padding)."""
    n, k = weight.shape
    n_pad, k_pad = -(-n // 16) * 16, -(-k // 4) * 4
    padded = torch.zeros(n_pad, k_pad, dtype=torch.int8)
    padded[:n, :k] = weight
    packed = padded.view(n_pad // 16, 16, k_pad // 4, 4).permute(0, 2, 1, 3).contiguous()
    scales = torch.zeros(n_pad, dtype=torch.float32)
    scales[:n] = scale.float()
    return packed, padded.sum(dim=1, dtype=torch.int32), scales


def linear(x: torch.Tensor, packed: torch.Tensor, row_sums: torch.Tensor, scale: torch.Tensor, n: int) -> torch.Tensor:
    """x (M, K) fp32 @ the packed int8 weights' (n, K).T, times their scales: (M, n) fp32."""
    return torch.ops.cogni_mamba.int8_linear(x, packed, row_sums, scale, n)
