"""How much faster TokenBatches delivers batches than the nano model can train on them, on this CPU.

    .venv/bin/python benchmarks/loader_speed.py [--tokens 20000000] [--seconds 3]

It prepares a synthetic dataset (random uint16 tokens, twice, for a 2-way mixture), times the loader
(single dataset and mixture) at B=16,T=256 and B=4,T=512, times a full nano-model training step
(forward, backward, AdamW) on the same shapes, and prints loader batches/s, tokens/s and the ratio
loader speed / trainer need. Timings are taken side by side in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cogni_mamba.config import preset
from cogni_mamba.data import TokenBatches
from cogni_mamba.model import CogniMamba

SHAPES = ((16, 256), (4, 512))


def write_shards(folder: Path, n_tokens: int, vocab: int, seed: int) -> Path:
    """A prepared folder with random tokens, in the format prepare() writes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {"train": n_tokens, "val": n_tokens // 100}
    for split, n in splits.items():
        rng.integers(0, vocab, size=n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    meta = {"format": 1, "tokenizer_fingerprint": "synthetic", "vocab_size": vocab, "dtype": "uint16",
            "splits": {s: {"tokens": n, "documents": 0} for s, n in splits.items()}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def rate(step, seconds: float) -> float:
    """Calls per second of step(), after one warm-up call, over about `seconds`."""
    step()
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or n < 3:
        step()
        n += 1
    return n / elapsed


def train_step_rate(B: int, T: int, seconds: float) -> float:
    """Optimizer steps per second of the nano preset at batch B x T (fp32, CPU)."""
    cfg = preset("nano").model
    model = CogniMamba(dataclasses.replace(cfg, max_seq_len=max(T, cfg.max_seq_len)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (B, T))

    def step():
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return rate(step, seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20_000_000, help="tokens per synthetic dataset")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        a = write_shards(Path(tmp) / "a", args.tokens, 4096, 0)
        b = write_shards(Path(tmp) / "b", args.tokens, 4096, 1)
        print(f"{'B x T':>9} {'loader':>8} {'batches/s':>11} {'tokens/s':>12} {'train steps/s':>14} {'ratio':>8}")
        for B, T in SHAPES:
            steps = train_step_rate(B, T, args.seconds)
            for name, dirs, weights in (("single", [a], None), ("mix 3:1", [a, b], [3, 1])):
                loader = TokenBatches(dirs, T, B, weights=weights, seed=0)
                batches = rate(lambda loader=loader: next(loader), args.seconds)
                print(f"{B:>4} x {T:<4}{name:>8} {batches:>11,.0f} {batches * B * T:>12,.0f} "
                      f"{steps:>14.2f} {batches / steps:>7,.0f}x")


if __name__ == "__main__":
    main()
