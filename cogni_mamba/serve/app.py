"""The FastAPI app: OpenAI's chat and text completion endpoints, /health, /v1/models and the web chat page.

A request's body is read up to MAX_BODY_BYTES (beyond: 413, before any parsing or tokenizing), validated
(-> 400 with an OpenAI-style error body), then submitted to the service's continuous-batching engine as
one Job (jobs.py; `n` choices share one prefill): up to `max_batch` generations share each model step (in the
engine's own process, or on its thread), `queue_size` more wait first come, first served, beyond that: 429.
The engine hands token ids to the event loop, where they become text (stop strings held back). A streamed
reply is sent as server-sent events in OpenAI's chunk format, ending `data: [DONE]`. When the client goes
away its generation is cancelled and its slots freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from ..errors import CogniError
from ..inference import EngineProcess
from .formats import ChatFormat, TextFormat, usage
from .jobs import Job, make_job, start
from .schemas import ApiError, ChatRequest, CompletionRequest, SamplingRequest, parse, validation_error
from .service import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_SIZE, Service

log = logging.getLogger("cogni_mamba.serve")
MAX_BODY_BYTES = 256 * 1024  # 64x a 1,024-token context of English text; a larger body is refused unread


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
        stopped = isinstance(self.service.engine, EngineProcess) and not self.service.engine.running
        return {"status": "engine stopped" if stopped else "ok", "model": self.service.name,
                "active_generations": stats.active, "queued": stats.queued, "max_batch": stats.max_batch,
                "max_concurrency": stats.max_batch, "queue_size": stats.max_queue,
                "generated_tokens": self.generated_tokens, "completed_requests": self.completed_requests,
                "threads": stats.threads, "weights": self.service.dtype}


# --- answering a job ----------------------------------------------------------------------------

async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused with a 413 as soon as it passes `limit` bytes (before it is parsed or tokenized)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(size: int, limit: int) -> ApiError:
    return ApiError(f"The request body is {size:,} bytes or more; this server accepts at most {limit:,}. Send a "
                    "shorter prompt or conversation.", status=413, code="request_too_large")


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


async def stream_events(fmt, job: Job, events: AsyncIterator[tuple[int, str | None]],
                        include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunk sequence: an opening chunk per choice, one per text piece, each choice's finish reason as
    it ends, usage, [DONE]. Every chunk carries one choice, named by its `index`.

    Events no client waits for share the next one's write: the openings go out with the first piece, a finish
    chunk with what follows it. Each write is a socket send for which the event loop must get the GIL back
    from the engine's thread (about 0.3 ms each at 8 clients on 2 busy cores).
    """
    held = "".join(sse(opening) for opening in map(fmt.opening, range(job.n)) if opening is not None)
    try:
        async for index, piece in events:
            if piece is None:
                held += sse(fmt.chunk("", job.finish_reason(index), index))
                continue
            yield held + sse(fmt.chunk(piece, None, index))
            held = ""
    except Exception as e:  # the status line has gone out already, so the error travels as an event
        yield held + sse(ApiError(f"Generation failed: {e}", status=500, type="server_error").body()) + sse("[DONE]")
        return
    if include_usage:
        held += sse(fmt.usage_chunk(usage(job)))
    yield held + sse("[DONE]")


async def respond(request: Request, state: ServerState, job: Job, req: SamplingRequest, fmt) -> Response:
    """Run a job; stream it as events or answer once it has finished."""
    events = start(state, job)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return JobStream(stream_events(fmt, job, events, include_usage), job)
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    texts: list[list[str]] = [[] for _ in range(job.n)]
    try:
        async for index, piece in events:
            if piece is not None:
                texts[index].append(piece)
    except Exception as e:
        raise ApiError(f"Generation failed: {e}", status=500, type="server_error") from None
    finally:
        watcher.cancel()
    choices = [("".join(t), job.finish_reason(i)) for i, t in enumerate(texts)]
    return JSONResponse(fmt.whole(choices, usage(job)))


# --- the app ------------------------------------------------------------------------------------

def create_app(service_or_checkpoint: Service | str | Path, api_key: str | None = None, *,
               max_batch: int = DEFAULT_MAX_BATCH, queue_size: int = DEFAULT_QUEUE_SIZE, device: str = "cpu",
               dtype: str = "auto", max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server's ASGI app for a Service, or for a checkpoint directory loaded onto `device` (then
    `max_batch`, `queue_size` and `dtype` set up its engine). Larger bodies than `max_body_bytes` get a 413."""
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

    async def check_key(request: Request) -> None:  # async: FastAPI would run a plain def on a worker thread
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
    async def health() -> Response:
        body = state.health()  # 503 once the engine process has stopped: a load balancer then looks elsewhere
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": state.started,
                                            "owned_by": "cogni-mamba", "context_length": service.max_seq_len}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request) -> Response:
        req = parse(ChatRequest, await read_body(request, max_body_bytes))
        prompt = service.chat_prompt([{"role": m.role, "content": m.text()} for m in req.messages])
        job = make_job(service, prompt, req, prompt_param="messages", stop_ids=service.chat_stop_ids())
        return await respond(request, state, job, req, ChatFormat(service.name))

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Response:
        req = parse(CompletionRequest, await read_body(request, max_body_bytes))
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
