"""OpenAI-compatible HTTP server (FastAPI) with streaming, and a one-page web chat at `/`.

    from cogni_mamba.serve import create_app
    app = create_app("runs/nano", api_key=None, max_batch=8, queue_size=32)

Needs the `serve` extra (fastapi, uvicorn). `cogni-mamba serve --checkpoint DIR` runs it with uvicorn.
"""

from .app import create_app
from .jobs import Job
from .service import DEFAULT_MAX_BATCH, DEFAULT_QUEUE_SIZE, Service

__all__ = ["DEFAULT_MAX_BATCH", "DEFAULT_QUEUE_SIZE", "Job", "Service", "create_app"]
