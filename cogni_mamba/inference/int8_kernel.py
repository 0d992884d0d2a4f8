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
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from ..device import cpu_flags
from ..errors import build_failure

SOURCE = Path(__file__).with_name("kernels") / "int8_linear.cpp"
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-fopenmp",
                 "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
# -fopenmp: ATen's parallel_for is inline OpenMP; the extension's libgomp.so.1 resolves to the one torch loaded


def wanted() -> bool:
    """False when the user asked for fbgemm's product (COGNI_MAMBA_INT8=fbgemm)."""
    return os.environ.get("COGNI_MAMBA_INT8", "").strip().lower() != "fbgemm"


@contextlib.contextmanager
def fbgemm_instead(active: bool = True) -> Iterator[None]:
    """Within it (when `active`), int8 layers made take fbgemm's product, as under COGNI_MAMBA_INT8=fbgemm; the
    variable is restored after (benchmarks compare the two in one process)."""
    before = os.environ.get("COGNI_MAMBA_INT8")
    if active:
        os.environ["COGNI_MAMBA_INT8"] = "fbgemm"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("COGNI_MAMBA_INT8", None)
        else:
            os.environ["COGNI_MAMBA_INT8"] = before


def cpu_supports() -> bool:
    """Whether this CPU has the AVX512 subsets the kernel is compiled for."""
    return cpu_flags().issuperset(CPU_FLAGS)


@functools.cache
def why_unavailable() -> str | None:
    """None when the kernel is built and loaded (building it the first time); else why not, in a phrase."""
    if not cpu_supports():
        return "this CPU has no AVX512-VNNI"
    try:
        from torch.utils import cpp_extension

        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)  # its notes about compilers: our one warning says what matters
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpp_extension.load("cogni_mamba_int8", [str(SOURCE)], extra_cflags=COMPILE_FLAGS,
                                   extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        finally:
            log.setLevel(level)
    except Exception as error:  # no compiler, no ninja, a full disk, a failed build: all mean "use fbgemm"
        return (f"building it failed ({build_failure(error)}); it needs a C++ compiler, ninja (`pip install ninja`) "
                "and a few MB free under ~/.cache/torch_extensions")
    _register_shape_function()
    return None


@functools.cache
def _register_shape_function() -> None:
    """Lets torch.export trace calls to the op (once per process, however often the kernel is loaded)."""
    torch.library.register_fake("cogni_mamba::int8_linear", _shape_only)


def _shape_only(x: torch.Tensor, packed: torch.Tensor, row_sums: torch.Tensor, scale: torch.Tensor,
                out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def available() -> bool:
    """Whether int8 products run on this kernel (building it if needed); warns once when a CPU that could run it
    cannot (a CPU without VNNI falls back to fbgemm quietly: nothing to do about it)."""
    if not wanted():
        return False
    reason = why_unavailable()
    if reason is not None and cpu_supports():
        _warn_once(reason)
    return reason is None


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
