"""How many intra-op threads the engine's steps use on a CPU: measured once, on the thread that runs them.

More threads are not always faster. A small model's operations are small, so splitting them gains little
against the cost of waking threads, and a server's engine thread shares the cores with the HTTP event loop,
so threads that spin-wait for each other lose twice. So the engine times its own step at each candidate
count, alternating between them, and keeps the fastest (the fewest threads unless more are at least
`MARGIN` faster).

Only one thread of a process should hold extra OpenMP threads. With torch's OpenMP backend (libgomp), every
thread that has run a multi-threaded operation keeps a pool of worker threads for as long as it lives, and
once all pools together hold more threads than there are CPUs, libgomp stops letting them spin-wait between
parallel regions (about 100 spins, then sleep), so each of a step's many small operations pays a wake-up.
Measured on a 2-core machine (SiLU over 224 x 1536 floats on a second thread, two intra-op threads against
one): 171-335 against 169-208 us while the main thread kept a pool from loading the model, 101-110 against
177-201 us when it had none. So a server loads its model on a short-lived thread (`on_own_thread`: the pool
goes with it) and the engine's thread is the only one left with a pool. An engine running on its own
thread (`Engine.start()`, the server) leaves one core to the rest of its process: on 2 cores, with the HTTP
server beside it, two intra-op threads were no faster (one client: 277-338 tokens/s, against 280-462 on one).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")
MARGIN = 0.1  # more threads must save at least this fraction of a step to be chosen
ROUNDS = 3  # alternating measurements per candidate; the best of them counts
TARGET_SECONDS = 0.02  # each measurement repeats the step until about this long


def thread_candidates(available: int) -> list[int]:
    """1, half of the available threads and all of them (distinct, ascending)."""
    return sorted({1, max(1, available // 2), max(1, available)})


def choose_threads(run_step: Callable[[], None], candidates: Sequence[int]) -> int:
    """The candidate thread count whose `run_step()` is fastest on this thread; leaves that count set."""
    candidates = sorted(set(candidates))
    if len(candidates) == 1:
        torch.set_num_threads(candidates[0])
        return candidates[0]
    repeats = {}
    for n in candidates:  # warm-up (first-call allocations) and the repeat count for ~TARGET_SECONDS
        torch.set_num_threads(n)
        run_step()
        start = time.perf_counter()
        run_step()
        repeats[n] = max(1, min(50, round(TARGET_SECONDS / max(time.perf_counter() - start, 1e-6))))
    best = {n: float("inf") for n in candidates}
    for _ in range(ROUNDS):  # alternate, so a burst of load elsewhere hits every candidate alike
        for n in candidates:
            torch.set_num_threads(n)
            start = time.perf_counter()
            for _ in range(repeats[n]):
                run_step()
            best[n] = min(best[n], (time.perf_counter() - start) / repeats[n])
    chosen = candidates[0]
    for n in candidates[1:]:
        if best[n] < best[chosen] * (1 - MARGIN):
            chosen = n
    torch.set_num_threads(chosen)
    return chosen


@torch.inference_mode()
def fastest_thread_count(model, cache, rows: int, *, available: int | None = None) -> int:
    """`choose_threads` for a one-token step of `rows` rows of an empty SlotCache (left empty again), among
    `thread_candidates(available)` (default: this thread's count)."""
    n = rows
    tokens = torch.zeros(n, 1, dtype=torch.long, device=cache.k.device)

    def step() -> None:
        for i in range(n):
            cache.set_length(i, 0)
        model(tokens, cache=cache.view(0, n), last_only=True)

    try:
        return choose_threads(step, thread_candidates(available or torch.get_num_threads()))
    finally:
        for i in range(n):
            cache.set_length(i, 0)


def on_own_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)` run on a short-lived thread: its result, or its exception raised here. Load and prepare
    a model this way when another thread will run its steps: the OpenMP pool the loading makes ends with it."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - raised again on the calling thread
            outcome["error"] = e

    thread = threading.Thread(target=work, name="cogni-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
