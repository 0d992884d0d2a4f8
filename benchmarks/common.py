"""Shared pieces of the training benchmarks.

- `bench_trainer`: the Trainer's own optimizer step (`Trainer.train_step`: its AdamW over its decay
  groups, autocast, GradScaler for fp16, clipping, TF32 and `torch.compile` as `build_trainer` sets
  them) on synthetic tokens at a constant lr, so the benchmarks need no data files. transformers'
  Llama runs through the same step behind `LlamaLoss` (the call our model answers); our model trains
  on its loss alone (`return_logits=False`), and `RunSpec(loss="logits")` runs it behind `WithLogits`,
  the old path that kept the full logits.
- `alternate` / `median`: time several candidates in turns, so load on a shared machine hits all alike.
- `RunSpec` / `measure` / `run_isolated`: one configuration measured in a fresh process, because a
  process's peak RSS only grows (on CUDA `max_memory_allocated` is reset instead, so GPU runs can stay
  in one process). `python benchmarks/common.py '<RunSpec as JSON>'` is that worker.
- `naive_attention`: the plain matmul-softmax attention that the ablation compares SDPA against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` without an installed package
    sys.path.insert(0, str(REPO))

from cogni_mamba import model as model_module  # noqa: E402
from cogni_mamba.config import Config, ModelConfig, TrainConfig, preset  # noqa: E402
from cogni_mamba.model import IGNORE_INDEX, CogniMamba  # noqa: E402
from cogni_mamba.train import build_trainer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# --- the training step ---------------------------------------------------------------------------

def ours_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x, y, return_logits=False)[1]


def hf_loss(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # transformers shifts `labels` itself and ignores the last position: labels=x scores the same
    # T-1 next-token pairs as our (x, y) with y's last entry set to -100 (see `synthetic_batch`).
    return model(input_ids=x, labels=x).loss


class LlamaLoss(torch.nn.Module):
    """transformers' LlamaForCausalLM answering the Trainer's call: `(x, y, return_logits=False) -> (None, loss)`."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_logits: bool = True):
        return None, hf_loss(self.hf, x, y)


class WithLogits(torch.nn.Module):
    """Our model through the training step before the loss-only path: the full logits come back (and the
    Trainer's step holds them until after backward) with a cross-entropy over their fp32 copy."""

    def __init__(self, model: CogniMamba):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_logits: bool = True):
        return self.model(x, y)


def synthetic_batch(vocab: int, batch: int, seq_len: int, seed: int, device: torch.device):
    """Random tokens x (B, T) and next-token targets y (B, T), last target ignored as in transformers."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    y = torch.cat((ids[:, 1:], torch.full((batch, 1), IGNORE_INDEX)), dim=1)
    return ids.to(device), y.to(device)


def bench_trainer(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
                  device: torch.device, *, compile: bool = False, model_config: ModelConfig | None = None,
                  lr: float = 1e-4):
    """A Trainer (from `build_trainer`) whose `train_step()` is one optimizer step over `batches` as its
    micro-batches (AdamW, `lr` held constant, weight decay 0.1, clip 1.0); nothing is written.

    `model` is our CogniMamba, or an adapter (`LlamaLoss`, `WithLogits`) with the same call;
    `model_config` (default `model.config`) is the shape the Trainer records in its Config."""
    B = batches[0][0].shape[0]
    cfg = TrainConfig(batch_size=B, grad_accum=len(batches), max_steps=10**9, lr=lr, min_lr=lr, warmup_steps=0,
                      weight_decay=0.1, grad_clip=1.0, precision=precision, compile=compile, log_to=[])
    config = Config(model=model_config or model.config, train=cfg)
    unused = Path(tempfile.gettempdir()) / f"cogni-bench-{os.getpid()}-never-written"
    return build_trainer(model, batches, None, cfg, config=config, out_dir=unused, device=device, progress=False,
                         log=lambda m: None)


# --- timing --------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# "wall": elapsed time (what a user waits). "cpu": this process's CPU time, which on a machine shared
# with other jobs counts only the work done, not the time spent descheduled; use it with one thread.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Seconds for one call of `fn`, the device drained before and after."""
    now = CLOCKS[clock]
    sync(device)
    t0 = now()
    fn()
    sync(device)
    return now() - t0


def alternate(candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device,
              clock: str = "wall") -> dict[str, list]:
    """Time each candidate `repeats` times in turns (A B A B ...), so slow phases of a loaded machine
    land on all of them; the order flips every round to cancel any first-mover effect."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(candidates[name], device, clock))
    return times


def add_machine_args(p) -> None:
    """The options every training benchmark takes: --device, --threads and --clock (see CLOCKS)."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: process CPU time (use with --threads 1 on a busy machine)")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# --- plain attention for the SDPA ablation ------------------------------------------------------

def naive_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q k^T / sqrt(D) + mask) v with the (T, S) score matrix materialised, as before fused kernels.

    Same signature and maths as `F.scaled_dot_product_attention` for what our model passes it.
    """
    D, T, S = q.shape[-1], q.shape[-2], k.shape[-2]
    if enable_gqa and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, S, D)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(D))  # (B, H, T, S)
    if is_causal:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs @ v  # (B, H, T, D)


@contextlib.contextmanager
def attention_impl(name: str):
    """Inside the block, our model's attention uses `name` ("sdpa" or "naive"); nothing else is touched.

    The model calls `F.scaled_dot_product_attention` through its module's `F`; we swap that one name
    for a namespace that forwards every other attribute to torch.nn.functional.
    """
    if name == "sdpa":
        yield
        return
    shim = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    shim.scaled_dot_product_attention = naive_attention
    saved = model_module.F
    model_module.F = shim
    try:
        yield
    finally:
        model_module.F = saved


# --- one measured configuration -----------------------------------------------------------------

@dataclass
class RunSpec:
    """One configuration to measure: model, technique switches, shape and how long to run."""

    preset: str = "nano"
    changes: dict = field(default_factory=dict)  # ModelConfig fields to change (n_kv_heads, tie_embeddings)
    precision: str = "bf16"
    attention: str = "sdpa"
    batch: int = 4
    seq_len: int = 256
    accum: int = 1
    compile: bool = False
    mode: str = "train"  # "train" or "decode"
    steps: int = 3
    warmup: int = 1
    new_tokens: int = 32  # decode mode
    device: str = "cpu"
    threads: int = 0  # 0: torch's default
    clock: str = "wall"  # see CLOCKS
    loss: str = "fused"  # "fused": the loss alone (the trainer's path); "logits": full logits + fp32 copy


def model_config(spec: RunSpec) -> ModelConfig:
    cfg = preset(spec.preset).model
    changes = dict(spec.changes)
    if spec.seq_len > cfg.max_seq_len:
        changes["max_seq_len"] = spec.seq_len
    return dataclasses.replace(cfg, **changes)


def rss_bytes() -> int:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _train(spec: RunSpec, model: CogniMamba, device: torch.device) -> dict:
    vocab = model.config.vocab_size
    batches = [synthetic_batch(vocab, spec.batch, spec.seq_len, seed=i, device=device) for i in range(spec.accum)]
    stepped = model if spec.loss == "fused" else WithLogits(model)
    trainer = bench_trainer(stepped, batches, spec.precision, device, compile=spec.compile, model_config=model.config)
    outcomes = []

    def step() -> None:
        outcomes.append(trainer.train_step())  # its float(loss) waits for the device: a timed step is whole

    first = timed(step, device)  # includes compilation when compiling
    for _ in range(spec.warmup - 1):
        step()
    times = [timed(step, device, spec.clock) for _ in range(spec.steps)]
    t = median(times)
    return {"step_s": t, "tokens_per_s": spec.batch * spec.seq_len * spec.accum / t, "first_step_s": first,
            "step_times": times, "last_loss": outcomes[-1].loss if spec.steps else math.nan,
            "loss_scale": trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None,
            "skipped_steps": sum(not o.applied for o in outcomes)}


@torch.inference_mode()
def _decode(spec: RunSpec, model: CogniMamba, device: torch.device) -> dict:
    model = model.to(DTYPES[spec.precision]).eval()
    prompt = synthetic_batch(model.config.vocab_size, spec.batch, spec.seq_len, 0, device)[0]
    cache = model.new_cache(spec.batch, spec.seq_len + spec.new_tokens)

    def run() -> None:
        cache.length = 0
        nxt = model(prompt, cache=cache, last_only=True).argmax(-1)  # (B, 1)
        for _ in range(spec.new_tokens - 1):
            nxt = model(nxt, cache=cache, last_only=True).argmax(-1)

    for _ in range(spec.warmup):
        run()
    times = [timed(run, device, spec.clock) for _ in range(spec.steps)]
    t = median(times)
    return {"step_s": t, "tokens_per_s": spec.batch * spec.new_tokens / t, "kv_cache_bytes": cache.nbytes()}


def _warm_libraries(spec: RunSpec, device: torch.device) -> None:
    """One step of a very small model, so the libraries' first-use buffers (oneDNN, OpenMP, cuBLAS
    workspaces) are in place before the baseline and are not counted as the measured model's memory."""
    cfg = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=256, hidden_dim=128, max_seq_len=64)
    with device:
        tiny = CogniMamba(cfg)
    with attention_impl(spec.attention):
        bench_trainer(tiny, [synthetic_batch(256, 2, 64, 0, device)], spec.precision, device).train_step()


def measure(spec: RunSpec) -> dict:
    """Build the model fresh and run `spec`; peak memory is the device's peak (CUDA) or peak RSS."""
    device = torch.device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    _warm_libraries(spec, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else rss_bytes()
    torch.manual_seed(0)
    with device:  # initialise on the device itself: a large preset's init is slow on the host
        model = CogniMamba(model_config(spec))
    with attention_impl(spec.attention):
        out = (_train if spec.mode == "train" else _decode)(spec, model, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss_bytes()
    out.update(params=model.num_parameters(), peak_bytes=peak - base, base_bytes=base)
    if device.type == "cuda":  # what the caching allocator held at most (what nvidia-smi would show)
        out["reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    del model
    return out


def run_isolated(spec: RunSpec, timeout: float = 1800) -> dict:
    """`measure(spec)` in a fresh Python process (its own peak RSS); returns its result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(dataclasses.asdict(spec))],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(specs: dict[str, RunSpec], repeats: int, isolate: bool) -> dict[str, list[dict]]:
    """Measure every spec `repeats` times, in turns (reversed on odd rounds); isolated runs use subprocesses."""
    results: dict[str, list[dict]] = {name: [] for name in specs}
    names = list(specs)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            results[name].append(run_isolated(specs[name]) if isolate else measure(specs[name]))
    return results


def summarise(runs: list[dict]) -> dict:
    """Median tokens/s and peak memory over repeated runs of one spec."""
    return {"tokens_per_s": median([r["tokens_per_s"] for r in runs]),
            "peak_bytes": median([r["peak_bytes"] for r in runs]),
            **{k: runs[0][k] for k in ("params", "kv_cache_bytes", "first_step_s") if k in runs[0]}}


# --- reporting -----------------------------------------------------------------------------------

def machine() -> str:
    """One line naming the device, threads and software, for the tables' captions."""
    if torch.cuda.is_available():
        dev = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        dev = f"CPU {platform.processor() or platform.machine()} {_cpu_model()}, {os.cpu_count()} cores"
    return (f"{dev}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: float) -> str:
    """Bytes for a table: KiB below 1 MiB, one decimal below 100 MiB."""
    if not math.isfinite(n):
        return "nan"
    if abs(n) < 2**20:
        return f"{n / 2**10:,.0f} KiB"
    return f"{n / 2**20:,.1f} MiB" if abs(n) < 100 * 2**20 else f"{n / 2**20:,.0f} MiB"


if __name__ == "__main__":  # the isolated worker: one RunSpec in, one JSON line out
    result = measure(RunSpec(**json.loads(sys.argv[1])))
    print(json.dumps(result))
