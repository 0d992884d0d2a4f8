"""Load: 1, 4, 8, 16 concurrent streaming clients against a live server (or the engine in-process).

Each level starts `clients` clients that send requests back to back until each has sent
--requests-per-client or --seconds have passed; a request streams its tokens, and the time of each
arrival is kept. Per level: aggregate generated tokens/s (all tokens / the level's wall time), p50 and
p95 time to the first token, p50 inter-token latency (per request: first to last piece over the tokens
after the first), and the ratios to one client, printed side by side. The acceptance check of issue 14
(8 clients: >= 3x one client's tokens/s, p50 time to first token <= 2x one client's) is printed at the
end when both levels ran. The clients start together (their same-length requests then arrive in bursts
of `clients` at once) or, with --stagger, spread over one request's time (as independent users' would).
Also per level (Linux): CPU milliseconds per request of the server (all its processes; "engine": its child
processes, the engine process) and of this load generator, which shares the machine's cores with the server.

HTTP (default): `cogni-mamba serve --engine E` on 127.0.0.1 and a free port (loopback only), streamed chat
completions read by one asyncio event loop (a light client); tokens are counted from the server's `usage`
(a chunk carries the text of every token made since the server last looked, so chunks may hold several
tokens under load). --engine process thread: both servers, taking turns --rounds times.
--engine-only: `cogni_mamba.inference.Engine` in this process, its background thread running the
steps and one Python thread per client iterating its Request (no HTTP).

Without --checkpoint the model is a random nano (its 4,096-token BPE trained on the built-in corpus, as the
demo's; --byte-tokenizer: the byte-level one), its special-token rows zeroed so every reply runs to --max-tokens.

    .venv/bin/python benchmarks/serve_load.py                                  # HTTP, nano-shaped, CPU
    .venv/bin/python benchmarks/serve_load.py --clients 1 8 --engine process thread --rounds 3 --stagger
    .venv/bin/python benchmarks/serve_load.py --engine-only --clients 1 8
    .venv/bin/python benchmarks/serve_load.py --device cuda --clients 1,8,32 --engine-only
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass
class Result:
    """One request: seconds from sending to each token (or chunk) that arrived, and tokens generated."""

    arrivals: list[float] = field(default_factory=list)
    tokens: int = 0
    total: float = 0.0

    @property
    def ttft(self) -> float:
        return self.arrivals[0] if self.arrivals else self.total


def random_checkpoint(directory: Path, *, byte_tokenizer: bool = False) -> Path:
    """A random model of the nano preset (a 4,096-token BPE trained on the built-in corpus, as the demo's),
    saved as a checkpoint; its special-token rows are zeroed so that every reply runs to max_tokens.
    With byte_tokenizer, the byte-level tokenizer instead (vocabulary 320, prompts ~3.5x longer)."""
    import dataclasses

    import torch

    from cogni_mamba.config import preset
    from cogni_mamba.model import CogniMamba
    from cogni_mamba.tokenizer import SimpleTokenizer, train_bpe
    from cogni_mamba.train.checkpoint import save_checkpoint

    cfg = preset("nano")
    if byte_tokenizer:
        tok = SimpleTokenizer()
    else:
        from cogni_mamba.corpus import CorpusSpec, bpe_text, corpus_documents

        texts = [bpe_text(d) for d in corpus_documents(CorpusSpec(size=1_500_000, seed=0))]
        tok = train_bpe(texts, cfg.model.vocab_size, progress=False)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, init_std=0.3))
    torch.manual_seed(0)
    model = CogniMamba(cfg.model).eval()
    with torch.no_grad():  # tied head: special tokens never win, replies run to max_tokens
        model.tok_embeddings.weight[sorted(tok.special_ids)] = 0
    save_checkpoint(directory, "random-nano", model, cfg, tokenizer=tok)
    return directory


def prompt_text(client: int, k: int) -> str:
    """Prompts of a few different lengths, so prefills of different sizes mix as they would."""
    return f"Client {client}, request {k}: tell me a story" + " about a fox and a bird" * (k % 4) + "."


# --- the two drivers: each runs one request and returns its Result --------------------------------

class HttpDriver:
    """Streamed chat completions over plain asyncio sockets, every client in one event loop of this process.

    A light load generator: the server under test shares this machine's cores with it, and a thread per client
    parsing its stream through an HTTP library took CPU (and turns on this process's interpreter lock) from the
    server, more so at 8 clients than at one. Each event is found by its "data: " (the chunked framing around it is
skipped, not parsed).
    """

    def __init__(self, url: str, max_tokens: int, temperature: float):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.max_tokens, self.temperature = max_tokens, temperature

    async def __call__(self, client: int, k: int) -> Result:
        import asyncio

        body = json.dumps({"messages": [{"role": "user", "content": prompt_text(client, k)}],
                           "max_tokens": self.max_tokens, "temperature": self.temperature, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        result = Result()
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(head + body)
            status = await reader.readline()
            if b" 200 " not in status:
                detail = (await reader.read()).decode(errors="replace")[:200]
                raise RuntimeError(f"HTTP {status.decode(errors='replace').strip()}: {detail}")
            await reader.readuntil(b"\r\n\r\n")  # the rest of the headers
            buffer = b""
            while chunk := await reader.read(65536):
                now = time.perf_counter() - start
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    at = event.find(b"data: ")
                    if at < 0 or event[at:] == b"data: [DONE]":
                        continue
                    data = json.loads(event[at + 6:])
                    if data["choices"] and data["choices"][0]["delta"].get("content"):
                        result.arrivals.append(now)
                    if data.get("usage"):
                        result.tokens = data["usage"]["completion_tokens"]
        finally:
            writer.close()
        result.total = time.perf_counter() - start
        return result


class EngineDriver:
    def __init__(self, engine, tokenizer, max_tokens: int, temperature: float):
        from cogni_mamba.config import GenerationConfig

        self.engine, self.tokenizer = engine, tokenizer
        self.settings = GenerationConfig(temperature=temperature, top_k=None, top_p=None, max_new_tokens=max_tokens)

    def __call__(self, client: int, k: int) -> Result:
        messages = [{"role": "user", "content": prompt_text(client, k)}]
        prompt = list(self.tokenizer.render_chat(messages, add_generation_prompt=True)[0])
        result = Result()
        start = time.perf_counter()
        request = self.engine.submit(prompt, self.settings, stop_ids=self.tokenizer.chat_stop_ids)
        for _ in request:
            result.arrivals.append(time.perf_counter() - start)
        result.tokens = len(result.arrivals)
        result.total = time.perf_counter() - start
        return result


# --- one level -----------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc; none elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/stat") if Path("/proc").is_dir() else ():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(entry.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.parent.name))
    return found


class CpuMeter:
    """CPU seconds so far of the server (its process and children; None: no server process) and this process."""

    def __init__(self, server_pid: int | None = None):
        self.server_pid = server_pid
        self.children = children_of(server_pid) if server_pid else []

    def read(self) -> dict[str, float]:
        if self.server_pid is None:
            return {"client": time.process_time()}
        engine = sum(cpu_seconds(p) for p in self.children)
        return {"server": cpu_seconds(self.server_pid) + engine, "engine": engine, "client": time.process_time()}


def run_level(driver, clients: int, per_client: int, seconds: float, stagger: float = 0.0,
              meter: CpuMeter | None = None) -> dict:
    """`clients` threads sending requests back to back: per_client each, or until `seconds` have passed.
    With `stagger`, client i sends its first request i * stagger seconds after the level starts."""
    meter = meter or CpuMeter()
    cpu_before = meter.read()
    results: list[Result] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        time.sleep(i * stagger)
        for k in range(per_client):
            if time.perf_counter() > deadline:
                return
            try:
                result = driver(i, k)
            except Exception as e:  # noqa: BLE001  (reported with the level, not fatal to the others)
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                results.append(result)

    async def async_client(i: int) -> None:
        await asyncio.sleep(i * stagger)
        for k in range(per_client):
            if time.perf_counter() > deadline:
                return
            try:
                results.append(await driver(i, k))
            except Exception as e:  # noqa: BLE001  (reported with the level, not fatal to the others)
                errors.append(f"{type(e).__name__}: {e}")
                return

    async def all_clients() -> None:
        await asyncio.gather(*(async_client(i) for i in range(clients)))

    start = time.perf_counter()
    if inspect.iscoroutinefunction(driver.__call__):  # HTTP: every client in one event loop
        asyncio.run(all_clients())
    else:  # the engine in-process: a thread per client iterating its Request
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - start
    cpu = {k: (v - cpu_before[k]) / max(1, len(results)) for k, v in meter.read().items()}  # seconds per request
    # Per request: the time from its first to its last piece over the tokens after the first (a streamed chunk
    # may carry several tokens when the server's event loop is behind, so gaps between chunks are not per token).
    itls = [(r.arrivals[-1] - r.arrivals[0]) / (r.tokens - 1) for r in results if r.tokens > 1 and r.arrivals]
    ttfts = sorted(r.ttft for r in results)
    return {"clients": clients, "requests": len(results), "errors": errors, "seconds": wall,
            "tokens": sum(r.tokens for r in results), "tok_s": sum(r.tokens for r in results) / wall,
            "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
            "itl_p50": statistics.median(itls) if itls else float("nan"),
            "request_seconds": statistics.median(r.total for r in results) if results else float("nan"),
            "cpu": cpu}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (nan for no values)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def print_table(rows: list[dict], markdown: bool) -> None:
    base = rows[0]
    head = ["clients", "requests", "seconds", "tokens/s", "x1 tokens/s", "TTFT p50", "TTFT p95", "x1 TTFT p50",
            "ITL p50", "CPU/req"]

    def cpu(r: dict) -> str:  # milliseconds per request: server (of it, the engine process) + load generator
        c = {k: v * 1e3 for k, v in r["cpu"].items()}
        server = f"{c['server']:.1f}" + (f" ({c['engine']:.1f})" if c.get("engine") else "") + " + " if "server" in c else ""
        return f"{server}{c['client']:.1f} ms"

    lines = [[str(r["clients"]), str(r["requests"]), f"{r['seconds']:.1f}", f"{r['tok_s']:,.0f}",
              f"{r['tok_s'] / base['tok_s']:.2f}x", f"{r['ttft_p50'] * 1e3:.0f} ms", f"{r['ttft_p95'] * 1e3:.0f} ms",
              f"{r['ttft_p50'] / base['ttft_p50']:.2f}x", f"{r['itl_p50'] * 1e3:.1f} ms", cpu(r)] for r in rows]
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        print(" ".join(f"{h:>11}" for h in head))
        for line in lines:
            print(" ".join(f"{c:>11}" for c in line))
    if "server" in rows[0]["cpu"]:
        print("CPU/req: CPU milliseconds per request of the server (in brackets: its engine process) + this load "
              "generator")
    else:
        print("CPU/req: CPU milliseconds per request of this process (the engine and its clients)")
    for r in rows:
        if r["errors"]:
            print(f"{r['clients']} clients: {len(r['errors'])} failed request(s), e.g. {r['errors'][0]}")
    one, eight = rows[0], next((r for r in rows if r["clients"] == 8), None)
    if one["clients"] == 1 and eight is not None:
        speed, ttft = eight["tok_s"] / one["tok_s"], eight["ttft_p50"] / one["ttft_p50"]
        verdict = "met" if speed >= 3 and ttft <= 2 else "NOT met"
        print(f"issue 14 target at 8 clients (>= 3x tokens/s, <= 2x p50 TTFT): {speed:.2f}x, {ttft:.2f}x -> {verdict}")


# --- main ----------------------------------------------------------------------------------------

def parse_clients(values: list[str]) -> list[int]:
    out = [int(v) for value in values for v in value.split(",") if v]
    if not out or min(out) < 1:
        raise SystemExit("--clients takes positive counts, e.g. --clients 1 4 8 16 or --clients 1,8,32")
    return out


def build_engine(args, checkpoint: Path):
    import torch

    from cogni_mamba.checkpoint import load_checkpoint
    from cogni_mamba.inference import Engine
    from cogni_mamba.inference.precision import prepare_model, resolve_inference_dtype
    from cogni_mamba.inference.threads import on_own_thread

    device = torch.device(args.device)

    def load():  # on a short-lived thread, as `serve` does (inference/threads.py says why)
        model, tokenizer = load_checkpoint(checkpoint, device)
        prepare_model(model, resolve_inference_dtype(args.dtype, device), quantize="int8" if args.int8 else None,
                      compile=args.compile)
        if args.compile:
            model.fast_decode.ready()
        return Engine(model, max_batch=args.max_batch or max(args.clients), max_queue=max(64, 2 * max(args.clients)),
                      bos_id=tokenizer.bos_id, threads=args.threads or "auto"), tokenizer

    engine, tokenizer = on_own_thread(load)
    return engine.start(), tokenizer


def measure(driver, args, meter: CpuMeter | None = None) -> list[dict]:
    """The levels in turn. With --stagger, each level's clients start one request's time (at one client) apart
    in all, so their requests arrive spread out as independent users' do, not all in one burst."""
    warm = run_level(driver, 1, 2, 30)  # warm-up: first-call allocations
    rows = []
    for c in args.clients:
        stagger = warm["request_seconds"] / c if args.stagger else 0.0
        rows.append(run_level(driver, c, args.requests_per_client, args.seconds, stagger, meter))
    return rows


def measure_server(args, checkpoint: Path, engine: str, log_dir: Path) -> tuple[list[dict], object]:
    """The levels against a fresh `cogni-mamba serve --engine ENGINE`; (rows, the engine's intra-op threads)."""
    from tests.test_serve_fixtures import LiveServer

    extra = ["--max-batch", str(args.max_batch or max(args.clients)), "--queue-size",
             str(max(64, 2 * max(args.clients))), "--dtype", args.dtype, "--engine", engine,
             *(["--int8"] if args.int8 else []), *(["--compile"] if args.compile else [])]
    server = LiveServer(checkpoint, *extra, device=args.device, threads=args.threads, log_dir=log_dir)
    try:
        meter = CpuMeter(server.proc.pid)
        return (measure(HttpDriver(server.url, args.max_tokens, args.temperature), args, meter),
                server.health().get("threads"))
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="checkpoint or run directory (default: a random nano-shaped model)")
    p.add_argument("--clients", nargs="+", default=["1", "4", "8", "16"], help="levels, e.g. 1 4 8 16 or 1,8,32")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests each client sends (default 4)")
    p.add_argument("--seconds", type=float, default=60.0, help="time limit per level (default 60)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--engine-only", action="store_true", help="drive the Engine in this process, without HTTP")
    p.add_argument("--engine", nargs="+", choices=("process", "thread"), default=["process"],
                   help="the server's --engine: process (serve's default: the model in a child process) or thread; "
                        "with both, the two servers take turns, --rounds times each, and print side by side")
    p.add_argument("--stagger", action="store_true",
                   help="start a level's clients spread over one request's time instead of all at once (then the "
                        "same-length requests do not arrive in synchronized bursts)")
    p.add_argument("--rounds", type=int, default=1, help="turns per --engine setting (default 1)")
    p.add_argument("--max-batch", type=int, help="the engine's / server's max batch (default: the most clients)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--int8", action="store_true", help="int8 weights (`serve --int8`)")
    p.add_argument("--compile", action="store_true", help="a lone request's steps compiled (`serve --compile`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the engine's steps (default: the engine's 'auto' choice, timed at start)")
    p.add_argument("--byte-tokenizer", action="store_true", help="the random model uses the byte-level tokenizer")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--quick", action="store_true", help="a smoke run: engine-only, clients 1 and 2, 8 tokens")
    args = p.parse_args(argv)
    args.clients = parse_clients(args.clients)
    if args.quick:
        args.engine_only, args.clients, args.requests_per_client, args.max_tokens = True, [1, 2], 1, 8
        args.byte_tokenizer = True  # no BPE training in a smoke run
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(Path(tmp) / "run",
                                                                                      byte_tokenizer=args.byte_tokenizer)
        mode = "engine in-process" if args.engine_only else f"HTTP server on 127.0.0.1 (--engine {' / '.join(args.engine)})"
        model = checkpoint if args.checkpoint else "random nano" + (" (byte tokenizer)" if args.byte_tokenizer else "")
        starts = "staggered" if args.stagger else "simultaneous"
        weights = args.dtype + (" int8" if args.int8 else "") + (" compiled" if args.compile else "")
        print(f"{mode}, {starts} starts: {model}, max_tokens={args.max_tokens}, "
              f"temperature={args.temperature}, dtype={weights}, device={args.device}, threads="
              f"{args.threads or 'auto'}, {args.requests_per_client} requests per client; load {load:.2f}")
        if args.engine_only:
            engine, tokenizer = build_engine(args, checkpoint)
            driver, stop = EngineDriver(engine, tokenizer, args.max_tokens, args.temperature), engine.stop
            try:
                results = {"engine in-process": [measure(driver, args)]}
                threads = engine.stats().threads
            finally:
                stop()
        else:
            results = {kind: [] for kind in args.engine}
            for _ in range(args.rounds):
                for kind in args.engine:
                    rows, threads = measure_server(args, checkpoint, kind, Path(tmp))
                    results[kind].append(rows)
    for kind, runs in results.items():
        for i, rows in enumerate(runs):
            print(f"\n{kind}{f' (turn {i + 1})' if len(runs) > 1 else ''}:")
            print_table(rows, args.markdown)
    print(f"intra-op threads of the engine's steps: {threads}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average at the end: {load:.2f}")


if __name__ == "__main__":
    main()
