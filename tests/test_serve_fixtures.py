"""Shared pieces of the server tests: a tiny checkpoint, a live `cogni-mamba serve` subprocess, and the
independent reference the replies are checked against (greedy decoding that recomputes the whole
sequence every step, with the chat template written out by hand from its documented layout).

The tiny model's embedding rows for the special tokens (and the vocabulary padding) are zeroed, so
its logits there are exactly 0 while some byte always scores higher: greedy decoding never picks
them, so every greedy reply runs to max_tokens unless a stop string or the client ends it, and its
text is just its bytes decoded as UTF-8.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cogni_mamba.config import Config, ModelConfig
from cogni_mamba.model import CogniMamba
from cogni_mamba.tokenizer import SimpleTokenizer
from tests.references import naive_greedy

httpx = pytest.importorskip("httpx", reason="the server tests need httpx (the dev extra)")
pytest.importorskip("fastapi", reason="the server tests need the serve extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the server tests need the serve extra (fastapi, uvicorn)")

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 4096  # long enough that a long reply outlasts the checks made while it runs
STARTUP_TIMEOUT = 90.0


@dataclass
class Tiny:
    """The checkpoint on disk, the same model in memory (for references) and the tokenizer's special ids."""

    path: Path
    model: CogniMamba
    specials: dict[str, int]


def make_tiny_checkpoint(run_dir: Path, context: int = CONTEXT) -> Tiny:
    """A random 2-layer model with SimpleTokenizer's byte vocabulary, saved as a checkpoint."""
    from cogni_mamba.train.checkpoint import save_checkpoint

    tok = SimpleTokenizer()
    torch.manual_seed(0)
    # init_std 0.3 so the random model does not collapse onto one repeated byte.
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size, hidden_dim=128,
                      max_seq_len=context, init_std=0.3)
    model = CogniMamba(cfg).eval()
    with torch.no_grad():
        model.tok_embeddings.weight[256:] = 0  # tied head: specials and padding rows score exactly 0
    save_checkpoint(run_dir, "step-1", model, Config(model=cfg), tokenizer=tok)
    return Tiny(run_dir, model, dict(tok.special_tokens))


def chat_ids(specials: dict[str, int], messages: list[dict[str, str]]) -> list[int]:
    """The documented template, by hand: <|endoftext|> (<|role|> bytes <|end|>)* <|assistant|>."""
    ids = [specials["<|endoftext|>"]]
    for m in messages:
        ids += [specials[f"<|{m['role']}|>"], *m["content"].encode("utf-8"), specials["<|end|>"]]
    return ids + [specials["<|assistant|>"]]


def text_ids(specials: dict[str, int], prompt: str) -> list[int]:
    """A raw completion prompt: BOS, then its bytes."""
    return [specials["<|endoftext|>"], *prompt.encode("utf-8")]


@torch.no_grad()
def naive_greedy_text(model: CogniMamba, prompt: list[int], n: int) -> str:
    """Argmax decoding without any cache (the whole sequence each step); the new bytes as UTF-8 text."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only spin, badly so beside the server process
    try:
        new = naive_greedy(model, prompt, n)
    finally:
        torch.set_num_threads(threads)
    assert all(t < 256 for t in new), "the tiny model picked a special token (its rows should score 0)"
    return bytes(new).decode("utf-8", errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m cogni_mamba serve` on 127.0.0.1 and a free port, as a real subprocess."""

    def __init__(self, checkpoint: Path, *extra: str, device: str = "cpu", threads: int | None = 1,
                 log_dir: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (log_dir or checkpoint.resolve().parent) / f"serve-{self.port}.log"
        cmd = [sys.executable, "-m", "cogni_mamba", "serve", "--checkpoint", str(checkpoint),
               "--port", str(self.port), "--device", device, "--dtype", "fp32", *extra]
        if threads is not None:  # one thread suits the tiny test model and a CPU shared with the test process
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {STARTUP_TIMEOUT:.0f} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll until predicate() is true; False when it never was within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@contextlib.contextmanager
def live_server(checkpoint: Path, *extra: str) -> Iterator[LiveServer]:
    """A LiveServer for the block; stopped (SIGTERM) afterwards."""
    s = LiveServer(checkpoint, *extra)
    try:
        yield s
    finally:
        s.stop()
