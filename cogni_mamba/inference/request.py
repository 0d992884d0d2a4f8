"""What the engine hands back: a Request (an iterator of new token ids), the error for a full queue, and
the engine's counters; and what occupies its cache rows (`_Group`, `_Row`). A Request's state is guarded
by its engine's lock; the engine fills it."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..config import GenerationConfig
from ..errors import CogniError
from ..generate import fit_prompt


class EngineBusy(CogniError):
    """The queue of requests waiting for a slot is full; retry in a moment."""


class Request:
    """One generation: iterate it for its new token ids (blocking). Stop ids are never yielded.

    `finish_reason` is None while it runs, then "stop" (a stop id, or a stop string seen by the text
    layer), "length" (max_new_tokens, or the context is full), "cancelled" or "error" (`error` says why).
    """

    def __init__(self, engine: Any, prompt: list[int], settings: GenerationConfig, stop_ids: frozenset[int],
                 generator: torch.Generator | None, index: int = 0):
        self._engine = engine
        self.prompt = prompt
        self.settings = settings
        self.stop_ids = stop_ids
        self.generator = generator
        self.index = index  # which of `submit_samples`' n samples this is
        self.finish_reason: str | None = None
        self.completion_tokens = 0  # tokens handed to the reader
        self.generated = 0  # tokens the engine has made (may run ahead of the reader)
        self._ready: collections.deque[int] = collections.deque()
        self.ids: list[int] = []  # every token made, in order (the prefix cache keeps them with the row)
        self._cancel: str | None = None
        self._listener = None
        self.error: BaseException | None = None  # why the engine failed it (finish_reason "error")

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def done(self) -> bool:
        """True once no more tokens will come."""
        return self.finish_reason is not None and not self._ready

    def __iter__(self) -> Request:
        return self

    def __next__(self) -> int:
        engine = self._engine
        while True:
            with engine._cond:
                if self._ready:
                    self.completion_tokens += 1
                    return self._ready.popleft()
                if self.error is not None:
                    raise CogniError(f"Generation failed: {self.error}") from self.error
                if self.finish_reason is not None:
                    raise StopIteration
                if engine.running:
                    engine._cond.wait()
                    continue
            if not engine.step() and self.finish_reason is None:  # no background thread: this reader drives
                raise RuntimeError("the engine has nothing to run but a request has not finished")

    def take(self) -> tuple[list[int], bool]:
        """Without blocking: the tokens made since the last call, and whether the request has ended."""
        with self._engine._cond:
            tokens = list(self._ready)
            self._ready.clear()
            self.completion_tokens += len(tokens)
            return tokens, self.finish_reason is not None

    def on_update(self, listener) -> None:
        """Call `listener()` (from the engine's thread) whenever tokens arrive or the request ends."""
        self._listener = listener

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop generating: no more tokens are handed out, and the slot is freed at the next step."""
        self._engine._cancel(self, reason)

    # --- called by the engine, with its lock held ---

    def _emit(self, token: int) -> None:
        self.generated += 1
        self.ids.append(token)
        self._ready.append(token)

    def _finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener()


def checked_submission(prompt: Sequence[int], settings: GenerationConfig | None, n: int, stop_ids: Iterable[int],
                       on_overflow: str, *, max_batch: int, max_len: int,
                       bos_id: int | None) -> tuple[list[int], GenerationConfig, frozenset[int]]:
    """What a submission of n samples queues: (the fitted prompt, its settings, its stop ids); CogniError for an n
    the engine cannot run at once (and fit_prompt's for a prompt that does not fit)."""
    settings = settings or GenerationConfig()
    if not 1 <= n <= max_batch:
        raise CogniError(f"Asked for {n} samples but the engine runs at most {max_batch} at once; "
                         f"ask for 1 to {max_batch}.")
    ids = fit_prompt(prompt, max_len, settings.max_new_tokens, bos_id=bos_id, on_overflow=on_overflow)
    return ids, settings, frozenset(int(s) for s in stop_ids)


def engine_busy(max_batch: int, max_queue: int, n: int = 1) -> EngineBusy:
    """Refused: unfinished requests would pass max_batch running + max_queue waiting (counts that add up, unlike a
    snapshot of running and queued taken while requests are being admitted)."""
    room = "no room" if n == 1 else f"no room for {n} more"
    slots, places = ("slot" if max_batch == 1 else "slots"), ("place" if max_queue == 1 else "places")
    return EngineBusy(f"The engine is busy: its {max_batch} generation {slots} and {max_queue} queue {places} have "
                      f"{room}; retry in a moment.")


def ended_on_its_own(request: Any, reason: str) -> bool:
    """True when `request` had ended on its own before `cancel(reason)` came. When the text layer finds a stop
    string in tokens made before the request ran out of length, the reply ends on it: the reason becomes "stop"."""
    if request.finish_reason is None or request._cancel is not None:
        return False
    if reason == "stop" and request.finish_reason == "length":
        request.finish_reason = "stop"
    return True


@dataclasses.dataclass
class _Group:
    """Requests sharing one prompt: prefilled once into one row, then copied to one row per request."""

    requests: list[Request]
    prompt: list[int]
    done: int = 0  # prompt tokens prefilled so far

    @property
    def live(self) -> list[Request]:
        return [r for r in self.requests if r._cancel is None]


@dataclasses.dataclass
class _Row:
    """What occupies one cache row: a prefilling group, or one decoding request with its next input token."""

    group: _Group | None = None
    request: Request | None = None
    next_token: int = 0
    seen: torch.Tensor | None = None  # (V,) bool: tokens in the context, for the repetition penalty


@dataclasses.dataclass
class EngineStats:
    """A snapshot of the engine's counters."""

    active: int  # cache rows in use (decoding and prefilling)
    queued: int  # requests waiting for a slot
    max_batch: int
    max_queue: int
    generated_tokens: int
    completed_requests: int
    prefill_tokens: int  # prompt tokens run through the model (n samples of one prompt count once)
    steps: int
    threads: int | None = None  # intra-op threads of the thread that runs the steps (None: not set by the engine)


def greedy_settings(max_new_tokens: int) -> GenerationConfig:
    """Argmax decoding with no filters (for evaluation and references)."""
    return GenerationConfig(temperature=0.0, top_k=None, top_p=None, min_p=None, max_new_tokens=max_new_tokens)
