"""One API request's generation: its n choices in the engine, and their text as the engine makes it.

A Job submits its prompt once for its n choices (`Engine.submit_samples`: one prefill, n cache rows;
with a seed S, choice i samples with seed S + i). The engine calls back from its thread when a choice
has new tokens; the event loop then takes them and turns them into text with `inference.text_pieces`
(stop strings held back, a stop string ends that choice). Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Any

from .. import inference
from ..config import GenerationConfig
from ..errors import CogniError
from ..inference import EngineBusy, TextStream, text_pieces
from .schemas import ApiError, SamplingRequest
from .service import Service

log = logging.getLogger("cogni_mamba.serve")


@dataclasses.dataclass
class Job:
    """A request's generation: its inputs, the engine requests (one per choice) once submitted, their text."""

    prompt: list[int]
    settings: GenerationConfig
    stop_ids: tuple[int, ...]
    stop_strings: list[str]
    n: int = 1
    requests: list[inference.Request] = dataclasses.field(default_factory=list)
    texts: list[TextStream] = dataclasses.field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def completion_tokens(self) -> int:
        """Tokens that went into the replies (each up to its stop string), all choices together."""
        return sum(text.tokens for text in self.texts)

    def finish_reason(self, index: int = 0) -> str | None:
        return self.requests[index].finish_reason if self.requests else None

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()


def plan_max_tokens(prompt_len: int, requested: int | None, param: str, prompt_param: str,
                    context: int, default: int) -> int:
    """How many tokens to generate, or an ApiError when the prompt or the request does not fit the context."""
    if prompt_len >= context:
        raise ApiError(f"The prompt ({prompt_param}) is {prompt_len} tokens but the model's context holds {context}; "
                       "shorten it.", param=prompt_param, code="context_length_exceeded")
    room = context - prompt_len
    if requested is None:
        return min(default, room)
    if requested > context:
        raise ApiError(f"{param} is {requested} but the model's context holds only {context} tokens; "
                       "ask for fewer.", param=param, code="context_length_exceeded")
    if requested > room:
        raise ApiError(f"The prompt ({prompt_len} tokens) plus {param} ({requested}) exceed the model's context "
                       f"of {context} tokens; set {param} to at most {room} or shorten the prompt.",
                       param=param, code="context_length_exceeded")
    return requested


def make_job(service: Service, prompt: list[int], req: SamplingRequest, *, prompt_param: str,
             stop_ids: tuple[int, ...]) -> Job:
    """A Job for a validated request, with its token budget checked against the context and n against the batch."""
    requested, param = req.requested_max_tokens()
    n = plan_max_tokens(len(prompt), requested, param, prompt_param, service.max_seq_len,
                        service.generation.max_new_tokens)
    if req.n > service.engine.max_batch:
        raise ApiError(f"n is {req.n} but this server generates at most {service.engine.max_batch} choices at once; "
                       f"ask for 1 to {service.engine.max_batch}.", param="n")
    try:
        settings = service.settings(n, req.sampling_changes())
    except CogniError as e:  # e.g. a combination the generation config rejects
        raise ApiError(str(e)) from None
    return Job(prompt=prompt, settings=settings, stop_ids=stop_ids, stop_strings=req.stop_strings(), n=req.n)


def start(state: Any, job: Job) -> AsyncIterator[tuple[int, str | None]]:
    """Submit a job to the state's service's engine (429 when its queue is full). The returned iterator gives
    (choice index, text piece) as the text comes, and (index, None) once that choice has ended (its finish
    reason is set); when it closes, the job is counted in `state.generated_tokens` and `completed_requests`."""
    service: Service = state.service
    service.engine.start()  # idempotent: the one background thread that runs every generation
    try:
        job.requests = service.submit(job.prompt, job.settings, job.stop_ids, n=job.n)
    except EngineBusy as e:
        raise ApiError(str(e), status=429, type="server_busy", code="queue_full") from None
    except CogniError as e:  # the engine process has stopped
        raise ApiError(str(e), status=503, type="server_error", code="engine_stopped") from None
    job.texts = [TextStream(service.decoder(), job.stop_strings) for _ in job.requests]
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # called on the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(wake.set)

    for request in job.requests:
        request.on_update(notify)
    return _events(state, job, wake)


async def _events(state: Any, job: Job, wake: asyncio.Event) -> AsyncIterator[tuple[int, str | None]]:
    running = list(range(len(job.requests)))
    try:
        while running:
            for i in list(running):
                request, text = job.requests[i], job.texts[i]
                tokens, ended = request.take()
                if ended and request.error is not None:
                    log.error("generation failed: %s", request.error)
                    raise request.error
                # The text of every token made since the last look goes out as one piece: when the event loop
                # falls behind the engine (many clients on few cores) it sends fewer, longer chunks, not a backlog.
                piece = "".join(text_pieces(request, text, tokens, ended))
                if piece:
                    yield i, piece
                if ended or text.stopped:
                    running.remove(i)
                    yield i, None
            if running:
                await wake.wait()
                wake.clear()
    finally:
        job.cancel()  # a no-op for the choices that have ended; frees the slots when the client went away
        state.generated_tokens += job.completion_tokens
        state.completed_requests += 1
