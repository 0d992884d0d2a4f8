"""The FastAPI app: OpenAI's chat and text completion endpoints, /health, /v1/models and the web chat page.

A request is validated (-> 400 with an OpenAI-style error body), then submitted to the service's
continuous-batching engine: up to `max_batch` generations share each model step on one background
thread, `queue_size` more wait first come, first served, and beyond that the answer is 429. The engine
hands token ids to the event loop, where they become text (stop strings held back). A streamed reply
is sent as server-sent events in OpenAI's chunk format, ending `data: [DONE]`. When the client goes
away its generation is cancelled and its slot freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import inference
from ..config import GenerationConfig
from ..errors import CogniError
from ..inference import EngineBusy, TextStream
from .formats import ChatFormat, TextFormat, usage
from .schemas import ApiError, ChatRequest, CompletionRequest, SamplingRequest, parse, validation_error
from .service import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_SIZE, Service

log = logging.getLogger("cogni_mamba.serve")


@dataclasses.dataclass
class Job:
    """One request's generation: its inputs, the engine request once submitted, and what it reports."""

    prompt: list[int]
    settings: GenerationConfig
    stop_ids: tuple[int, ...]
    stop_strings: list[str]
    request: inference.Request | None = None
    completion_tokens: int = 0  # tokens that went into the reply (up to a stop string)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def finish_reason(self) -> str | None:
        return None if self.request is None else self.request.finish_reason

    def cancel(self) -> None:
        if self.request is not None:
            self.request.cancel()


class ServerState:
    """What the endpoints share: the service (model, tokenizer, engine), the API key and a few counters."""

    def __init__(self, service: Service, api_key: str | None):
        self.service = service
        self.api_key = api_key
        self.generated_tokens = 0
        self.completed_requests = 0
        self.started = int(time.time())

    def health(self) -> dict[str, Any]:
        stats = self.service.engine.stats()
        return {"status": "ok", "model": self.service.name, "active_generations": stats.active,
                "queued": stats.queued, "max_batch": stats.max_batch, "max_concurrency": stats.max_batch,
                "queue_size": stats.max_queue, "generated_tokens": self.generated_tokens,
                "completed_requests": self.completed_requests, "threads": stats.threads}


# --- running a job ------------------------------------------------------------------------------

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
    """A Job for a validated request, with its token budget checked against the context."""
    requested, param = req.requested_max_tokens()
    n = plan_max_tokens(len(prompt), requested, param, prompt_param, service.max_seq_len,
                        service.generation.max_new_tokens)
    try:
        settings = service.settings(n, req.sampling_changes())
    except CogniError as e:  # e.g. a combination the generation config rejects
        raise ApiError(str(e)) from None
    return Job(prompt=prompt, settings=settings, stop_ids=stop_ids, stop_strings=req.stop_strings())


def start(state: ServerState, job: Job) -> AsyncIterator[str]:
    """Submit a job to the engine (429 when its queue is full); its text pieces arrive through the returned iterator."""
    service = state.service
    service.engine.start()  # idempotent: the one background thread that runs every generation
    try:
        job.request = service.submit(job.prompt, job.settings, job.stop_ids)
    except EngineBusy as e:
        raise ApiError(str(e), status=429, type="server_busy", code="queue_full") from None
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify() -> None:  # called on the engine's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(wake.set)

    job.request.on_update(notify)
    return _pieces(state, job, wake)


async def _pieces(state: ServerState, job: Job, wake: asyncio.Event) -> AsyncIterator[str]:
    """Token ids from the engine -> text pieces, a stop string ending the request; counted when it ends."""
    request = job.request
    text = TextStream(state.service.decoder(), job.stop_strings)
    try:
        while True:
            tokens, ended = request.take()
            for token in tokens:
                job.completion_tokens += 1
                piece = text.put(token)
                if piece:
                    yield piece
                if text.stopped:
                    request.cancel(reason="stop")
                    return
            if ended:
                if request.error is not None:
                    log.error("generation failed: %s", request.error)
                    raise request.error
                tail = text.flush()
                if text.stopped:  # a stop string completed by the last, flushed character
                    request.cancel(reason="stop")
                if tail:
                    yield tail
                return
            await wake.wait()
            wake.clear()
    finally:
        request.cancel()  # a no-op once it has ended; frees the slot when the client went away
        state.generated_tokens += job.completion_tokens
        state.completed_requests += 1


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client disconnects (for replies that are not streamed)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


class JobStream(StreamingResponse):
    """A streamed reply whose job is cancelled however the response ends (finished, disconnected, failed)."""

    def __init__(self, content: AsyncIterator[str], job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


def sse(data: Any) -> str:
    """One server-sent event carrying JSON (or the literal [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(fmt, job: Job, pieces: AsyncIterator[str], include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: an opening chunk, one per text piece, the finish reason, usage, [DONE]."""
    opening = fmt.opening()
    if opening is not None:
        yield sse(opening)
    try:
        async for piece in pieces:
            yield sse(fmt.chunk(piece))
    except Exception as e:  # the status line has gone out already, so the error travels as an event
        yield sse(ApiError(f"Generation failed: {e}", status=500, type="server_error").body())
        yield sse("[DONE]")
        return
    yield sse(fmt.chunk("", job.finish_reason))
    if include_usage:
        yield sse(fmt.usage_chunk(usage(job)))
    yield sse("[DONE]")


async def respond(request: Request, state: ServerState, job: Job, req: SamplingRequest, fmt) -> Response:
    """Run a job; stream it as events or answer once it has finished."""
    pieces = start(state, job)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return JobStream(stream_events(fmt, job, pieces, include_usage), job)
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        text = "".join([piece async for piece in pieces])
    except Exception as e:
        raise ApiError(f"Generation failed: {e}", status=500, type="server_error") from None
    finally:
        watcher.cancel()
    return JSONResponse(fmt.whole(text, job.finish_reason, usage(job)))


# --- the app ------------------------------------------------------------------------------------

def create_app(service_or_checkpoint: Service | str | Path, api_key: str | None = None, *,
               max_batch: int = DEFAULT_MAX_BATCH, queue_size: int = DEFAULT_QUEUE_SIZE, device: str = "cpu",
               dtype: str = "auto") -> FastAPI:
    """The server's ASGI app for a Service, or for a checkpoint directory loaded onto `device` (then
    `max_batch`, `queue_size` and `dtype` set up its engine)."""
    service = service_or_checkpoint
    if not isinstance(service, Service):
        if max_batch < 1 or queue_size < 0:
            raise CogniError(f"max_batch must be >= 1 and queue_size >= 0, got {max_batch} and {queue_size}; "
                             "choose other values.")
        service = Service.from_checkpoint(service_or_checkpoint, device, dtype=dtype, max_batch=max_batch,
                                          queue_size=queue_size)
    state = ServerState(service, api_key or None)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        service.engine.start()
        yield
        service.engine.stop()  # uvicorn has already let in-flight requests finish

    app = FastAPI(title="Cogni-Mamba", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    add_error_handlers(app)

    def check_key(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError("Missing or wrong API key; send the header 'Authorization: Bearer <key>'.",
                           status=401, type="authentication_error", code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return state.health()

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": state.started,
                                            "owned_by": "cogni-mamba", "context_length": service.max_seq_len}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await request.body())
        prompt = service.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        job = make_job(service, prompt, req, prompt_param="messages", stop_ids=service.chat_stop_ids())
        return await respond(request, state, job, req, ChatFormat(service.name))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await request.body())
        prompt = service.text_prompt(req.prompt_text())
        job = make_job(service, prompt, req, prompt_param="prompt", stop_ids=service.text_stop_ids())
        return await respond(request, state, job, req, TextFormat(service.name))

    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body; FastAPI's 422 becomes a 400."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        err = ApiError(f"{e.detail}.", status=e.status_code, type="invalid_request_error")
        return JSONResponse(err.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        err = ApiError(f"Internal server error ({type(e).__name__}); see the server log.", status=500,
                       type="server_error")
        return JSONResponse(err.body(), status_code=500)
