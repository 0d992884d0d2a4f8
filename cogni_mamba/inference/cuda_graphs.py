"""Decode steps replayed as CUDA graphs: what `--compile` does on a GPU.

A small model's decode step on a GPU is bound by kernel launches, not by arithmetic: the lean step is ~15
kernels a layer of a few microseconds each, and the Python that launches them costs more than they do. A
CUDA graph records a step's launches once and replays them with one call. A graph reads and writes the
memory it was recorded with, so `GraphedDecoder` keeps everything it reads in place:

- a token id and a position per row, in two buffers of its own, filled before each replay;
- the KV cache itself: the graph runs `StaticStep` (the pure step the CPU's compiled graph runs) over the
  cache's first R rows and S slots, read where they are; the new keys and values come out of the graph and
  are written at each real row's position after it;
- one graph per (R, S) bucket: rows rounded up to a power of two (the extra rows get token 0 at position 0,
  attend to nothing cached, and are dropped), slots up to a multiple of SLOT_STEP (slots past a row's
  position are masked). A bucket's graph is recorded at the first step that needs it, in milliseconds, and
  kept while the cache is the same tensor (a new cache, as each `generate` call makes, drops them).

Steps it cannot take (more than MAX_ROWS rows, rows not from row 0, a left-padded cache) run the eager lean
step, as does every step after a failed recording (one warning). A graph computes what the eager StaticStep
computes: the tests run this bookkeeping on the CPU with `CallAgain` standing in for the graph and check
every row's greedy tokens against full fp32 recomputation; `scripts/gpu_check.sh` (step "graphs") checks
the real graphs against the eager step on a GPU and times both.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from ..errors import build_failure
from .compiled_step import StaticStep, _longest

MAX_ROWS = 64  # steps of more rows run eagerly (a GPU's eager step is no longer launch-bound there)
SLOT_STEP = 128  # graphs attend to the cache's slots in multiples of this


class CudaGraph:
    """`fn()`'s kernels recorded once, after two warm-up calls on a side stream (as CUDA requires), into the
    decoder's shared memory `pool`; `replay()` runs them again on the same memory, refreshing `outputs`."""

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, ...]], pool=None):
        # the caller makes the model's GPU the current device (`torch.cuda.device`): streams and capture are per device
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread-local: the server's other threads (requests arriving, seeded generators made) may use CUDA meanwhile
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn()

    def replay(self) -> None:
        self.graph.replay()


class CallAgain:
    """A stand-in for CudaGraph on any device (tests): `replay()` calls `fn` again and copies its results into the
    first call's outputs, so the caller sees what a graph gives (fixed output tensors, inputs read from buffers)."""

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, ...]], pool=None):
        self.fn = fn
        self.outputs = fn()

    def replay(self) -> None:
        for kept, new in zip(self.outputs, self.fn(), strict=True):
            kept.copy_(new)


def bucket_rows(rows: int, room: int) -> int:
    """The rows a graph for `rows` rows runs: the next power of two, at most the cache's `room` rows."""
    return min(1 << (rows - 1).bit_length(), room)


def bucket_slots(filled: int, room: int) -> int:
    """The cached slots a graph attends to when rows hold up to `filled`: a multiple of SLOT_STEP, at most `room`."""
    return min(max(1, -(-filled // SLOT_STEP)) * SLOT_STEP, room)


class GraphedDecoder:
    """A `FastDecoder` whose steps of up to MAX_ROWS rows from a cache's row 0 replay CUDA graphs of `StaticStep`
    (see the module's docstring). `recorder`: how a graph is made (CudaGraph; CallAgain in tests)."""

    def __init__(self, decoder, *, recorder: Callable | None = None):
        self.eager = decoder
        self.model = decoder.model
        self.step = StaticStep(decoder, head=True)
        device = self.device = self.model.tok_embeddings.weight.device
        self.recorder = recorder or CudaGraph
        self._pool = torch.cuda.graph_pool_handle() if recorder is None else None  # the graphs share their memory
        self._ids = torch.zeros(MAX_ROWS, dtype=torch.long, device=device)
        self._pos = torch.zeros(MAX_ROWS, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int], CudaGraph | CallAgain] = {}
        self._cache: tuple | None = None  # the cache tensors the graphs read (their addresses and shape)
        self.failed: str | None = None
        self.recorded = 0  # graphs recorded so far

    def supports(self, cache) -> bool:
        return self.eager.supports(cache)

    def ready(self, announce: Callable[[str], None] | None = None) -> None:
        """Nothing to build ahead: each graph is recorded at its first step, in milliseconds."""

    def __getattr__(self, name: str):
        """Everything else (`exact`, `prefill`, ...) is the eager FastDecoder's."""
        if name == "eager":  # not set yet (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.eager, name)

    def _takes(self, ids: torch.Tensor, cache) -> bool:
        """Whether this step replays a graph: up to MAX_ROWS rows from a cache's row 0, no left padding."""
        if ids.shape[0] > MAX_ROWS or self.failed:
            return False
        return (getattr(cache, "start", 0) == 0 and getattr(cache, "pad", None) is None
                and cache.k.dtype == self.eager.dtype)

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        if not self._takes(ids, cache):
            return self.eager(ids, cache)
        B = ids.shape[0]
        pos = cache.positions(1).view(-1)  # refuses a full cache; one shared position for a KVCache
        rows, slots = bucket_rows(B, cache.k.shape[1]), bucket_slots(_longest(cache), cache.k.shape[3])
        tensors = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape))
        if tensors != self._cache:  # another cache: the graphs read the old one's memory
            self._graphs.clear()
            self._cache = tensors
        self._ids[:B].copy_(ids.view(B))
        self._ids[B:rows].zero_()
        self._pos[:B].copy_(pos.expand(B))
        self._pos[B:rows].zero_()
        try:  # on the model's GPU (cuda:1 too): a capture on another device's stream would record nothing
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                graph = self._graphs.get((rows, slots))
                if graph is None:
                    graph = self._graphs[(rows, slots)] = self._record(cache, rows, slots)
                graph.replay()
        except Exception as error:  # noqa: BLE001 - an op that cannot be recorded: eager from now on
            self._give_up(error)
            return self.eager(ids, cache)
        logits, k, v = graph.outputs
        at, index = self._pos[:B], torch.arange(B, device=ids.device)
        cache.k[:, index, :, at] = k[:, :B].transpose(0, 1)  # (B, L, Hkv, D): row b's new keys at its slot at[b]
        cache.v[:, index, :, at] = v[:, :B].transpose(0, 1)
        cache.advance(1)
        return logits[:B].view(B, 1, -1).to(self.eager.dtype, copy=True)  # the graph's buffer is reused next step

    def _record(self, cache, rows: int, slots: int):
        keys, values = cache.k[:, :, :, :slots], cache.v[:, :, :, :slots]  # views: the cache's own memory
        ids, pos, step = self._ids[:rows], self._pos[:rows], self.step
        self.recorded += 1
        return self.recorder(lambda: step(ids, pos, keys, values), self._pool)

    def _give_up(self, error: BaseException) -> None:
        self._graphs.clear()
        self.failed = f"recording the decode step as a CUDA graph failed ({build_failure(error)})"
        warnings.warn(f"{self.failed}; decoding runs the eager step.", stacklevel=3)
