"""`cogni-mamba serve`: an OpenAI-compatible API and a web chat page for a checkpoint, on uvicorn."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import CogniError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API with a web chat page",
                       description="Serve a checkpoint: POST /v1/chat/completions and /v1/completions (streaming "
                                   "or not), GET /v1/models and /health, and a web chat page at /.")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a checkpoint directory, or a run directory (its latest checkpoint is served)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("COGNI_MAMBA_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $COGNI_MAMBA_API_KEY, else none)")
    p.add_argument("--max-batch", "--max-concurrency", dest="max_batch", type=int, default=None, metavar="N",
                   help="generations that share each model step (continuous batching; default 8 on a CPU, 32 on a "
                        "GPU); more wait in a first-come queue")
    p.add_argument("--queue-size", type=int, default=32, metavar="N",
                   help="requests allowed to wait for a slot (default 32); beyond it the server answers 429")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights' dtype (default auto: bf16 on CPUs and GPUs that compute it natively, else fp32)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights with one scale per output row (faster on CPUs, most with AVX512-VNNI; tokens "
                        "may differ from fp32)")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps (up to 16 rows) as one compiled graph (CPU with a C++ compiler; built "
                        "at start-up, 10-60 s the first time per checkpoint); on a CUDA GPU, replay steps of up to "
                        "64 rows as CUDA graphs")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads per operation of the engine's steps (default: the fastest of 1, half and all "
                        "but one of torch's threads, timed at start-up; one core stays for the HTTP side)")
    p.add_argument("--engine", choices=("thread", "process"), default="process",
                   help="where the model runs: process (default: a child process of its own, so generation and the "
                        "HTTP side do not take turns on one Python interpreter, and a crash there leaves the server "
                        "answering 503) or thread (a background thread of the server's process: ~250 MB less memory "
                        "and ~2 s faster to start, slower under many clients)")
    p.add_argument("--model-name", default=None, help="the model id /v1/models reports (default: from the path)")
    p.add_argument("--shutdown-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long in-flight requests may take to finish (default 120)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve import Service, create_app
    except ImportError as e:
        raise CogniError(f"Serving needs FastAPI and uvicorn ({e.name} is missing); "
                         "install them with: pip install 'cogni-mamba[serve]'.") from None
    from ..device import resolve_device
    from ..inference.compiled_step import build_now
    from ..inference.threads import on_own_thread

    if not 0 <= args.port <= 65535:
        raise CogniError(f"--port must be between 0 and 65535, got {args.port}.")
    if (args.max_batch is not None and args.max_batch < 1) or args.queue_size < 0:
        raise CogniError("--max-batch must be at least 1 and --queue-size at least 0.")
    if args.threads is not None:
        if args.threads < 1:
            raise CogniError(f"--threads must be at least 1, got {args.threads}.")
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in LOOPBACK and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this port can use "
              "the model.", file=sys.stderr)
    device = resolve_device(args.device)
    max_batch = args.max_batch or (8 if device.type == "cpu" else 32)

    def load() -> Service:  # on a thread of its own, which takes its OpenMP pool with it (see inference/threads.py)
        service = Service.from_checkpoint(args.checkpoint, device, name=args.model_name, dtype=args.dtype,
                                          quantize="int8" if args.int8 else None, compile=args.compile,
                                          max_batch=max_batch, queue_size=args.queue_size,
                                          threads=args.threads or "auto", engine_process=args.engine == "process")
        if service.model is not None:  # the engine process has built it already
            build_now(service.model)
        return service

    service = on_own_thread(load)
    app = create_app(service, args.api_key)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {service.name} (context {service.max_seq_len} tokens, {service.dtype}, batch up to {max_batch}) at "
          f"http://{shown}:{args.port}/ - chat page at /, API at /v1", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.shutdown_timeout)
    uvicorn.Server(config).run()
    return 0
