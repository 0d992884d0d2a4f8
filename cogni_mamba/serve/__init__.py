"""OpenAI-compatible HTTP server (FastAPI) with streaming, and a one-page web chat at `/`.

    from cogni_mamba.serve import create_app
    app = create_app("runs/nano", api_key=None, max_concurrency=4, queue_size=32)

Needs the `serve` extra (fastapi, uvicorn). `cogni-mamba serve --checkpoint DIR` runs it with uvicorn.
"""

from .app import DEFAULT_MAX_CONCURRENCY, DEFAULT_QUEUE_SIZE, create_app
from .engine import Engine, Job

__all__ = ["DEFAULT_MAX_CONCURRENCY", "DEFAULT_QUEUE_SIZE", "Engine", "Job", "create_app"]
