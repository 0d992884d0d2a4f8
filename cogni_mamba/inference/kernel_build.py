"""Building our C++ kernels (`kernels/*.cpp`) at first use, with torch.utils.cpp_extension (cached by torch under
~/.cache/torch_extensions: ~10 s once per kernel). A machine that cannot build one (no C++ compiler, no ninja, a full
disk) gets the reason in a phrase, and the kernel's caller falls back to torch's own product."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..errors import build_failure

KERNELS = Path(__file__).with_name("kernels")
BASE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-fopenmp",
              "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
# -fopenmp: ATen's parallel_for is inline OpenMP; the extension's libgomp.so.1 resolves to the one torch loaded


@contextlib.contextmanager
def env_override(name: str, value: str, active: bool = True) -> Iterator[None]:
    """Within it (when `active`), environment variable `name` is `value`; restored after (benchmarks compare a kernel
    and torch's product in one process: the layers made inside it read the variable)."""
    before = os.environ.get(name)
    if active:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def usable(wanted: bool, why_unavailable: Callable[[], str | None], cpu_supports: Callable[[], bool],
           warn: Callable[[str], None]) -> bool:
    """Whether a kernel runs here: wanted (not turned off by its variable) and built; `warn(reason)` when the CPU
    could have run it but the build failed (a CPU without the instructions falls back quietly: nothing to do)."""
    if not wanted:
        return False
    reason = why_unavailable()
    if reason is not None and cpu_supports():
        warn(reason)
    return reason is None


def build(name: str, source: str, extra_flags: Sequence[str], *, op: str,
          shape: Callable[..., torch.Tensor]) -> str | None:
    """Build and load kernels/`source` as the extension `name`, and give its operator `op` ("library::name") the
    shape function `shape` (so torch.export can trace calls to it); None when it loaded, else why not, in a phrase."""
    try:
        from torch.utils import cpp_extension

        log = logging.getLogger("torch.utils.cpp_extension")
        level = log.level
        log.setLevel(logging.ERROR)  # its notes about compilers: the caller's one warning says what matters
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cpp_extension.load(name, [str(KERNELS / source)], extra_cflags=[*BASE_FLAGS, *extra_flags],
                                   extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        finally:
            log.setLevel(level)
    except Exception as error:  # no compiler, no ninja, a full disk, a failed build: all mean "use torch's product"
        where = os.environ.get("TORCH_EXTENSIONS_DIR") or "~/.cache/torch_extensions"
        return (f"building it failed ({build_failure(error)}); it needs a C++ compiler, ninja (`pip install ninja`) "
                f"and a few MB free under {where}")
    _register_shape(op, shape)
    return None


@functools.cache
def _register_shape(op: str, shape: Callable[..., torch.Tensor]) -> None:
    """Once per process, however often the kernel is loaded."""
    torch.library.register_fake(op, shape)
