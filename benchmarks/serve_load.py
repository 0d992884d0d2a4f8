"""Load on a live local server: requests/s and generated tokens/s at 1, 4 and 8 concurrent clients.

Starts `cogni-mamba serve` on 127.0.0.1 (a free port) for a checkpoint, or for a random model of the
nano preset's shape with the byte-level tokenizer, whose special-token rows are zeroed so that every
reply runs to --max-tokens (a random model would otherwise stop at random). Each client streams chat
completions back to back; each level stops after --requests requests or --seconds, whichever is first.
Tokens are counted from the server's `usage`, and the ratios to one client are printed side by side.

    .venv/bin/python benchmarks/serve_load.py
    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/nano --max-tokens 128 --server-concurrency 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_serve_fixtures import LiveServer, wait_for  # noqa: E402  (the tests' subprocess launcher)


def random_checkpoint(directory: Path) -> Path:
    """A random model of the nano preset's shape with the byte tokenizer, saved as a checkpoint."""
    import dataclasses

    import torch

    from cogni_mamba.config import preset
    from cogni_mamba.model import CogniMamba
    from cogni_mamba.tokenizer import SimpleTokenizer
    from cogni_mamba.train.checkpoint import save_checkpoint

    tok = SimpleTokenizer()
    cfg = preset("nano")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, init_std=0.3))
    torch.manual_seed(0)
    model = CogniMamba(cfg.model).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[256:] = 0  # tied head: special tokens never win, replies run to max_tokens
    save_checkpoint(directory, "random-nano", model, cfg, tokenizer=tok)
    return directory


def one_request(http: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, completion tokens) of one streamed chat completion."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.8,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    tokens = 0
    with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - start
    return (first if first is not None else total), total, tokens


def run_level(url: str, clients: int, n_requests: int, seconds: float, max_tokens: int) -> dict:
    """`clients` threads sending requests back to back until n_requests are done or time is up."""
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    issued = 0
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        nonlocal issued
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    if issued >= n_requests or time.perf_counter() > deadline:
                        return
                    issued += 1
                    k = issued
                result = one_request(http, url, f"Client {i}, request {k}: tell me a story.", max_tokens)
                with lock:
                    results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "seconds": wall, "req_s": len(results) / wall,
            "tok_s": tokens / wall, "ttft": statistics.median(r[0] for r in results),
            "latency": statistics.median(r[1] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint or run directory (default: a random nano-shaped model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per level (default 60)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--server-concurrency", type=int, default=8, help="the server's --max-concurrency (default 8)")
    p.add_argument("--server-threads", type=int, default=None, help="the server's --threads (default: torch's)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(tmp) / "run")
        server = LiveServer(checkpoint, "--max-concurrency", str(args.server_concurrency), "--queue-size", "64",
                            device=args.device, threads=args.server_threads, log_dir=Path(tmp))
        try:
            run_level(server.url, 1, 2, 30, 8)  # warm-up (first-call allocations)
            rows = [run_level(server.url, c, args.requests, args.seconds, args.max_tokens) for c in args.clients]
            wait_for(lambda: server.health()["active_generations"] == 0, 30)
        finally:
            server.stop()

    print(f"server: {checkpoint}  max_tokens={args.max_tokens}  server concurrency={args.server_concurrency}  "
          f"threads={args.server_threads or 'torch default'}  device={args.device}")
    print(f"{'clients':>7} {'requests':>8} {'seconds':>8} {'req/s':>8} {'tokens/s':>9} {'x1 tok/s':>8} "
          f"{'TTFT p50':>9} {'latency p50':>11}")
    base = rows[0]["tok_s"]
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['seconds']:>8.1f} {r['req_s']:>8.2f} {r['tok_s']:>9.1f} "
              f"{r['tok_s'] / base:>7.2f}x {r['ttft'] * 1000:>7.0f}ms {r['latency'] * 1000:>9.0f}ms")


if __name__ == "__main__":
    main()
