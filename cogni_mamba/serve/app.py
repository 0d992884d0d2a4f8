"""The FastAPI app: OpenAI's chat and text completion endpoints, /health, /v1/models and the web chat page.

A request is validated (-> 400 with an OpenAI-style error body), admitted by a fair gate (at most
`max_concurrency` generations run at once, `queue_size` wait in line, more -> 429), then generated on a
worker thread (torch releases the GIL, so threads run in parallel) that hands text pieces to the event
loop. A streamed reply is sent as server-sent events in OpenAI's chunk format, ending `data: [DONE]`.
When the client goes away its generation is cancelled before the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CogniError
from .engine import Engine, Job
from .formats import ChatFormat, TextFormat, usage
from .gate import Gate, ServerBusy
from .schemas import ApiError, ChatRequest, CompletionRequest, SamplingRequest, parse, validation_error

log = logging.getLogger("cogni_mamba.serve")

DEFAULT_MAX_CONCURRENCY = 4
DEFAULT_QUEUE_SIZE = 32
_DONE = object()


@dataclass
class _Failure:
    error: BaseException


class ServerState:
    """What the endpoints share: the engine, the gate, the worker threads and a few counters."""

    def __init__(self, engine: Engine, api_key: str | None, max_concurrency: int, queue_size: int):
        self.engine = engine
        self.api_key = api_key
        self.gate = Gate(max_concurrency, queue_size)
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="cogni-generate")
        self.generated_tokens = 0
        self.completed_requests = 0
        self.started = int(time.time())

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.engine.name, "active_generations": self.gate.running,
                "queued": self.gate.waiting, "max_concurrency": self.gate.max_running,
                "queue_size": self.gate.max_waiting, "generated_tokens": self.generated_tokens,
                "completed_requests": self.completed_requests}


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


def make_job(engine: Engine, prompt: list[int], req: SamplingRequest, *, prompt_param: str,
             stop_ids: tuple[int, ...]) -> Job:
    """A Job for a validated request, with its token budget checked against the context."""
    requested, param = req.requested_max_tokens()
    n = plan_max_tokens(len(prompt), requested, param, prompt_param, engine.max_seq_len,
                        engine.generation.max_new_tokens)
    try:
        settings = engine.settings(n, req.sampling_changes())
    except CogniError as e:  # e.g. a combination the generation config rejects
        raise ApiError(str(e)) from None
    return Job(prompt=prompt, settings=settings, stop_ids=stop_ids, stop_strings=req.stop_strings())


async def admit(state: ServerState) -> None:
    """Wait for a generation slot; a 429 when the queue is full too."""
    try:
        await state.gate.acquire()
    except ServerBusy as e:
        raise ApiError(str(e), status=429, type="server_busy", code="queue_full") from None


def start(state: ServerState, job: Job) -> AsyncIterator[str]:
    """Run an admitted job on a worker thread; its text pieces arrive through the returned iterator.

    The gate slot is released when the thread finishes (not when the client leaves), so no more than
    max_concurrency generations ever run at once.
    """
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue = asyncio.Queue()

    def hand_over(item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening any more
            loop.call_soon_threadsafe(pieces.put_nowait, item)

    def work() -> None:
        try:
            for piece in state.engine.run(job):
                hand_over(piece)
        except BaseException as e:  # reported to the request, which answers with an error body
            log.exception("generation failed")
            hand_over(_Failure(e))
        finally:
            hand_over(_DONE)

    def finished(_: object) -> None:
        state.gate.release()
        state.generated_tokens += job.completion_tokens
        state.completed_requests += 1

    try:
        future = loop.run_in_executor(state.executor, work)
    except BaseException:
        state.gate.release()
        raise
    future.add_done_callback(finished)
    return _drain(pieces)


async def _drain(pieces: asyncio.Queue) -> AsyncIterator[str]:
    while (item := await pieces.get()) is not _DONE:
        if isinstance(item, _Failure):
            raise item.error
        yield item


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    """Set job.cancel when the client disconnects (for replies that are not streamed)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


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
            self.job.cancel.set()


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
    """Admit and run a job; stream it as events or answer once it has finished."""
    await admit(state)
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

def create_app(engine_or_checkpoint: Engine | str | Path, api_key: str | None = None, *,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, queue_size: int = DEFAULT_QUEUE_SIZE,
               device: str = "cpu") -> FastAPI:
    """The server's ASGI app for an Engine, or for a checkpoint directory loaded onto `device`."""
    if max_concurrency < 1 or queue_size < 0:
        raise CogniError(f"max_concurrency must be >= 1 and queue_size >= 0, got {max_concurrency} and "
                         f"{queue_size}; choose other values.")
    engine = engine_or_checkpoint
    if not isinstance(engine, Engine):
        engine = Engine.from_checkpoint(engine_or_checkpoint, device)
    state = ServerState(engine, api_key or None, max_concurrency, queue_size)
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        state.executor.shutdown(wait=True)  # uvicorn has already let in-flight requests finish

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
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": state.started,
                                            "owned_by": "cogni-mamba", "context_length": engine.max_seq_len}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await request.body())
        prompt = engine.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        job = make_job(engine, prompt, req, prompt_param="messages", stop_ids=engine.chat_stop_ids())
        return await respond(request, state, job, req, ChatFormat(engine.name))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await request.body())
        prompt = engine.text_prompt(req.prompt_text())
        job = make_job(engine, prompt, req, prompt_param="prompt", stop_ids=engine.text_stop_ids())
        return await respond(request, state, job, req, TextFormat(engine.name))

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
