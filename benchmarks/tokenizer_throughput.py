"""Tokenization throughput: parallel `encode_batch` against a single-threaded `encode` loop, side by side.

    .venv/bin/python benchmarks/tokenizer_throughput.py [--tokenizer DIR|gpt2|simple] [--data FILE] [--repeat 3]

Defaults to GPT-2's files and the TinyStories sample in ../shared/data. Prints MB/s (UTF-8 input bytes per
second, best of --repeat runs) of both and their ratio; the two must produce identical ids.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cogni_mamba.tokenizer import EOS_TOKEN, load_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def best_time(fn, repeat: int) -> tuple[float, list[list[int]]]:
    """The fastest of `repeat` runs of fn() and its result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default=str(SHARED / "gpt2"), help="tokenizer folder or name (default: GPT-2 files)")
    p.add_argument("--data", default=str(SHARED / "tinystories" / "TinyStories-sample.txt"), help="a .txt corpus")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts (default 3)")
    args = p.parse_args()

    tok = load_tokenizer(args.tokenizer)
    docs = [d for d in Path(args.data).read_text(encoding="utf-8").split(EOS_TOKEN) if d]
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    tok.encode_batch(docs[:64])  # warm up the thread pool and caches outside the timings

    t_loop, ids_loop = best_time(lambda: [tok.encode(d) for d in docs], args.repeat)
    t_batch, ids_batch = best_time(lambda: tok.encode_batch(docs), args.repeat)
    assert ids_loop == ids_batch, "encode_batch and encode disagree"
    n_tokens = sum(map(len, ids_batch))

    print(f"tokenizer {tok.name} ({tok.kind}), {len(docs):,} documents, {mb:.2f} MB, {n_tokens:,} tokens, "
          f"{os.cpu_count()} CPUs, best of {args.repeat}")
    print(f"encode loop (1 thread):  {mb / t_loop:8.2f} MB/s  {n_tokens / t_loop / 1e6:6.2f} M tokens/s")
    print(f"encode_batch (parallel): {mb / t_batch:8.2f} MB/s  {n_tokens / t_batch / 1e6:6.2f} M tokens/s")
    print(f"ratio batch/loop:        {t_loop / t_batch:8.2f}x")


if __name__ == "__main__":
    main()
