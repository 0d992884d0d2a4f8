"""The engine in a process of its own: `cogni-mamba serve` (its default, `--engine process`).

In one process the server's event loop (HTTP, JSON, tokenizing, text) and the engine's scheduler share
one interpreter lock: torch lets go of it inside its kernels, but the Python around them (and all of the
event loop's work) takes turns. In a process of its own the engine never waits for the HTTP side, and a
crash there (out of memory) leaves a server that answers 503 with a sentence. On a 2-core CPU with a nano
model at 8 clients it gave 3.1-4.0x one client's tokens/s where the thread gave 2.7-3.8x (benchmarks/RESULTS.md),
for ~250 MB more memory and ~2 s more start-up; `serve --engine thread` keeps the engine on a thread.
`EngineProcess` starts an `Engine` in a spawned child process that loads the checkpoint itself, and offers the
server the in-process engine's surface: `submit_samples` gives `RemoteRequest`s (take / on_update / cancel /
iterate, finish_reason, error), `stats()`, `start()`, `stop()`, `max_batch`. The parent keeps the tokenizer and
the text; the child sees token ids only.

Two one-way pipes carry pickled tuples:

    parent -> child   ("submit", first id, prompt, settings, n, stop ids) | ("cancel", id, reason) | ("stop",)
    child -> parent   ("ready", info) or ("failed", sentence), once; then after each scheduler iteration
                      ("update", [(id, new tokens, finish reason or None, error or None), ...], stats)

The parent admits a request only while its own count of unfinished requests leaves room (`max_batch`
running plus `max_queue` waiting), so the 429 is decided at once, without a round trip. If the child
dies, every unfinished request ends with an error that says so, and later submissions are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import signal
import threading
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..config import GenerationConfig
from ..errors import CogniError
from .precision import weights_label
from .request import EngineStats, Request, checked_submission, ended_on_its_own, engine_busy
from .threads import on_own_thread

START_TIMEOUT = 600.0  # seconds the child may take to load the model (a cold start of a large checkpoint)


class RemoteRequest(Request):
    """One generation running in the engine process: an `inference.Request` whose tokens the parent's reader
    thread fills in (`id` names it to the child)."""

    def __init__(self, owner: EngineProcess, rid: int, prompt: list[int], settings: GenerationConfig,
                 stop_ids: frozenset[int], index: int):
        super().__init__(owner, prompt, settings, stop_ids, None, index)
        self.id = rid


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """What the child needs to build the engine: the checkpoint, where and how to run it."""

    checkpoint: str
    device: str
    dtype: str
    max_batch: int
    max_queue: int
    threads: int | str | None
    quantize: str | None = None
    compile: bool = False


class EngineProcess:
    """An `Engine` in a spawned child process (see the module's docstring). Raises CogniError with the child's
    own sentence when the checkpoint cannot be loaded there."""

    def __init__(self, checkpoint: str | Path, device: Any = "cpu", dtype: str = "auto", *, max_batch: int = 8,
                 max_queue: int = 32, threads: int | str | None = None, quantize: str | None = None, compile: bool = False,
                 max_len: int, bos_id: int | None):
        self.max_batch, self.max_queue, self.max_len, self.bos_id = max_batch, max_queue, max_len, bos_id
        self._cond = threading.Condition()  # guards the requests' state, the live table and the snapshot
        self._send_lock = threading.Lock()
        self._live: dict[int, RemoteRequest] = {}
        self._next_id = 0
        self._dead: str | None = None
        self._stats = EngineStats(active=0, queued=0, max_batch=max_batch, max_queue=max_queue, generated_tokens=0,
                                  completed_requests=0, prefill_tokens=0, steps=0)
        spec = EngineSpec(str(checkpoint), str(device), dtype, max_batch, max_queue, threads, quantize, compile)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads or locks
        commands_out, commands_in = context.Pipe(duplex=False)
        events_out, events_in = context.Pipe(duplex=False)
        self._reaping = threading.Lock()  # multiprocessing's join / is_alive / exitcode are not safe from two threads
        self._process = context.Process(target=child_main, args=(commands_out, events_in, spec),
                                        name="cogni-engine", daemon=True)
        self._process.start()
        commands_out.close()
        events_in.close()
        self._commands, self._events = commands_in, events_out
        self.info = self._wait_until_ready()  # {"dtype": "int8" or the weights' dtype}; threads come with stats()
        self._reader = threading.Thread(target=self._read, name="cogni-engine-reader", daemon=True)
        self._reader.start()

    def _wait_until_ready(self) -> dict[str, Any]:
        message = None
        with contextlib.suppress(EOFError, OSError):
            if self._events.poll(START_TIMEOUT):
                message = self._events.recv()
        if message is None or message[0] != "ready":
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            if message is not None and message[0] == "failed":
                raise CogniError(message[1])
            raise CogniError(f"The engine process stopped while loading the model (exit code {self._process.exitcode}); "
                             "the machine may be out of memory: try a smaller --max-batch or free some memory.")
        return message[1]

    # --- the Engine surface the server uses ---------------------------------------------------------

    @property
    def running(self) -> bool:
        if self._dead is not None:
            return False
        with self._reaping:
            return self._process.is_alive()

    def start(self) -> EngineProcess:
        """The child runs its scheduler from the start; nothing to do (kept for the Engine's surface)."""
        return self

    def step(self) -> bool:
        """Steps run in the child: nothing to run here (a Request read after the child has gone ends, not waits)."""
        return False

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to stop after its current step and wait for it (killed after `timeout` seconds)."""
        with contextlib.suppress(OSError, ValueError):
            self._send(("stop",))
        with self._reaping:
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        with contextlib.suppress(OSError):
            self._commands.close()

    def stats(self) -> EngineStats:
        """The counters as of the child's last scheduler iteration."""
        with self._cond:
            return self._stats

    def submit(self, prompt: Sequence[int], settings: GenerationConfig | None = None, *,
               stop_ids: Iterable[int] = (), on_overflow: str = "warn") -> RemoteRequest:
        return self.submit_samples(prompt, settings, 1, stop_ids=stop_ids, on_overflow=on_overflow)[0]

    def submit_samples(self, prompt: Sequence[int], settings: GenerationConfig | None = None, n: int = 1, *,
                       stop_ids: Iterable[int] = (), on_overflow: str = "warn") -> list[RemoteRequest]:
        """Queue n generations of one prompt (prefilled once in the child); EngineBusy when there is no room."""
        ids, settings, stops = checked_submission(prompt, settings, n, stop_ids, on_overflow, max_batch=self.max_batch,
                                                  max_len=self.max_len, bos_id=self.bos_id)
        with self._cond:
            if self._dead is not None:
                raise CogniError(self._dead)
            if len(self._live) + n > self.max_batch + self.max_queue:
                raise engine_busy(self.max_batch, self.max_queue, n)
            first, self._next_id = self._next_id, self._next_id + n
            requests = [RemoteRequest(self, first + i, ids, settings, stops, i) for i in range(n)]
            self._live.update((r.id, r) for r in requests)
        self._send(("submit", first, ids, settings, n, tuple(sorted(stops))))
        return requests

    # --- internals ----------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._commands.send(message)

    def _cancel(self, request: RemoteRequest, reason: str) -> None:
        with self._cond:
            if ended_on_its_own(request, reason):
                return
            first = request._cancel is None
            request._cancel = request._cancel or reason
            request._ready.clear()
            request._finish(reason)
            running = first and request.id in self._live and self._dead is None
            self._cond.notify_all()
        if running:
            with contextlib.suppress(OSError, ValueError):  # the child has gone: nothing left to free
                self._send(("cancel", request.id, reason))
        request._notify()

    def _read(self) -> None:
        """The reader thread: apply the child's updates and wake the requests' listeners."""
        while True:
            try:
                message = self._events.recv()
            except (EOFError, OSError):
                self._child_gone()
                return
            if message[0] != "update":
                continue
            _, updates, stats = message
            woken = []
            with self._cond:
                self._stats = dataclasses.replace(EngineStats(*stats), max_queue=self.max_queue)
                for rid, tokens, reason, error in updates:
                    request = self._live.get(rid)
                    if request is None:
                        continue
                    if reason is not None:
                        del self._live[rid]
                    if request._cancel is not None:
                        continue
                    request._ready.extend(tokens)
                    request.ids.extend(tokens)
                    request.generated += len(tokens)
                    if error is not None:
                        request.error = CogniError(error)
                    if reason is not None:
                        request._finish(reason)
                    woken.append(request)
                self._cond.notify_all()
            for request in woken:
                request._notify()

    def _child_gone(self) -> None:
        with self._reaping:
            self._process.join(timeout=1)
            code = self._process.exitcode
        with self._cond:
            if self._dead is None:
                self._dead = (f"The engine process stopped (exit code {code}); the server cannot generate any more: "
                              "restart it (if the machine ran out of memory, with a smaller --max-batch).")
            self._stats = dataclasses.replace(self._stats, active=0, queued=0)
            orphans = list(self._live.values())
            self._live.clear()
            for request in orphans:
                if request.finish_reason is None:
                    request.error = CogniError(self._dead)
                    request._finish("error")
            self._cond.notify_all()
        for request in orphans:
            request._notify()


# --- the child ------------------------------------------------------------------------------------------

def child_main(commands, events, spec: EngineSpec) -> None:
    """The engine process: load the model, start the engine, then obey commands until "stop" or the parent goes."""
    # Ctrl-C and SIGTERM reach every process of the server; the parent decides when generation ends
    # (after uvicorn has let in-flight requests finish), and says so with "stop" or by closing the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = on_own_thread(_build_engine, spec)  # its OpenMP pool goes with that thread (see threads.py)
        info = {"dtype": weights_label(engine.model)}
    except CogniError as e:
        events.send(("failed", str(e)))
        return
    except Exception as e:  # noqa: BLE001 - reported to the parent as one sentence
        events.send(("failed", f"The engine process could not load {spec.checkpoint}: {type(e).__name__}: {e}"))
        return
    link = _ChildLink(engine, events)
    events.send(("ready", info))
    engine.start(after_step=link.flush)
    while True:
        try:
            message = commands.recv()
        except (EOFError, OSError):
            break
        if message[0] == "stop":
            break
        try:  # one command that fails must not take every request down with the process
            if message[0] == "submit":
                link.submit(*message[1:])
            elif message[0] == "cancel":
                link.cancel(*message[1:])
        except Exception:  # noqa: BLE001 - a bug, not the user's input (submit reports that to its request)
            traceback.print_exc()
    engine.stop()
    with contextlib.suppress(OSError):
        link.flush()
        events.close()


def _build_engine(spec: EngineSpec):
    from .compiled_step import build_now
    from .engine import Engine
    from .loading import load_model_for_inference

    model, tokenizer, _ = load_model_for_inference(spec.checkpoint, spec.device, spec.dtype, quantize=spec.quantize,
                                                   compile=spec.compile)
    build_now(model)  # with compile: before the child says it is ready, so the parent waits for it
    # The parent admits requests (max_batch + max_queue unfinished at most), so the child's queue never refuses.
    return Engine(model, max_batch=spec.max_batch, max_queue=spec.max_batch + spec.max_queue,
                  bos_id=None if tokenizer is None else tokenizer.bos_id, threads=spec.threads)


class _ChildLink:
    """The child's side: requests by id, and the ids with news since the last `flush` (one message per step)."""

    def __init__(self, engine, events):
        self.engine, self.events = engine, events
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()  # the engine's thread and the command thread both send
        self.requests: dict[int, Any] = {}
        self.dirty: set[int] = set()
        self.announced = False  # the first flush sends the counters even with no news (the thread count is set)

    def submit(self, first: int, prompt: list[int], settings: GenerationConfig, n: int, stop_ids: tuple[int, ...]):
        def mark(request) -> None:
            with self.lock:
                self.dirty.add(first + request.index)
            if request.generated == 1 and request.finish_reason is None:
                self.flush()  # a first token goes out at once, not after the others' decode pass

        with self.lock:  # registered before the engine thread can flush their first tokens
            try:
                requests = self.engine.submit_samples(prompt, settings, n, stop_ids=stop_ids, on_overflow="error",
                                                      on_update=mark)
            except Exception as e:  # noqa: BLE001 - this request fails; the process, and everyone else's, go on
                said = str(e) if isinstance(e, CogniError) else f"the engine could not take it ({type(e).__name__}: {e})"
                failed = [(first + i, [], "error", said) for i in range(n)]
            else:
                self.requests.update((first + r.index, r) for r in requests)
                return
        self.send(("update", failed, self._stats()))

    def cancel(self, rid: int, reason: str) -> None:
        with self.lock:
            request = self.requests.get(rid)
        if request is not None:
            request.cancel(reason)

    def flush(self) -> None:
        """Send what the last scheduler iteration made (on the engine's thread, once per iteration)."""
        with self.lock:
            ids, self.dirty = self.dirty, set()
            pending = [(rid, self.requests.get(rid)) for rid in ids]
        updates = []
        for rid, request in pending:
            if request is None:
                continue
            tokens, ended = request.take()
            if ended:
                with self.lock:
                    self.requests.pop(rid, None)
                error = None if request.error is None else str(request.error)
                updates.append((rid, tokens, request.finish_reason, error))
            elif tokens:
                updates.append((rid, tokens, None, None))
        if updates or not self.announced:
            self.announced = True
            self.send(("update", updates, self._stats()))

    def send(self, message: tuple) -> None:
        with self.send_lock:
            self.events.send(message)

    def _stats(self) -> tuple:
        stats = self.engine.stats()  # a flat tuple by hand: dataclasses.astuple deep-copies (14 against 2.4 us)
        return tuple(getattr(stats, f.name) for f in dataclasses.fields(stats))
