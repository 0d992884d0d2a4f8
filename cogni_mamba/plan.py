"""Sizing from a time budget: which model trains best in M minutes on this machine.

Candidates come from one depth dial (depth d: d layers of width 64 * d, heads of 64, a quarter of
them for keys and values, SwiGLU width 3 * dim), so one number orders them from small to large.
Each is timed for a few seconds with the Trainer's own step on this device, at the run's batch,
sequence length, precision and thread count, which predicts the tokens D it can see in the budget.

The pick uses the compute-optimal loss fit of Hoffmann et al. (2022, "Chinchilla", approach 3),
L(N, D) = E + A / N^alpha + B / D^beta, with the paper's constants, over each candidate's parameters N
and *measured* D, and takes the lowest. Why this and not "20 tokens per parameter": that rule is what
the fit gives when tokens per second fall as 1 / N (FLOP-bound hardware at scale); on a CPU, and for
small models on a GPU, they fall much more slowly (a model 4x larger is far less than 4x slower),
so the best model is larger than 20 tokens per parameter would say. The constants were fitted on
another corpus and tokenizer, so the predicted values are not our losses; only where the sum is
lowest is used.

Chinchilla's D is fresh tokens. When the prepared data is smaller than what a candidate would read
in the budget, it repeats it, and a repeated token teaches less than a new one: D is replaced by the
effective data of Muennighoff et al. (2023, "Scaling Data-Constrained Language Models"),
D' = U + U R* (1 - exp(-R / R*)), for U unique tokens seen 1 + R times, with their fitted R* = 15.4.
Without it a small model that loops over a small corpus many times looks better than it is (measured
on the TinyStories sample in benchmarks/RESULTS.md). `benchmarks/recipe.py --auto-size` checks the pick against the fixed nano preset on
held-out data.

Memory is respected: a candidate whose training memory estimate (`stats.train_memory`) exceeds 90%
of what is free (RAM, or the GPU's free memory) is not taken.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, ModelConfig, replace
from .device import free_memory
from .errors import CogniError
from .stats import human_bytes, param_counts, train_memory

CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10
MIN_STEPS = 50  # a budget that cannot give the smallest model this many optimizer steps is too small
DEPTHS = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20)
EVAL_SHARE = 0.05  # of the budget spent evaluating and saving, roughly, at the default intervals
MEMORY_SHARE = 0.9
REPEAT_SCALE = 15.4  # R*: how many repeats of the data are worth (at most) a new epoch's worth, Muennighoff et al.


def model_at_depth(depth: int, vocab_size: int, seq_len: int) -> ModelConfig:
    """The model of one depth: `depth` layers of width 64 * depth (heads of 64, a quarter for K/V)."""
    dim = 64 * depth
    n_heads = max(2, dim // 64)
    n_kv = max(1, n_heads // 4)
    while n_heads % n_kv:
        n_kv -= 1
    return ModelConfig(dim=dim, n_layers=depth, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab_size,
                       hidden_dim=3 * dim, max_seq_len=seq_len)


def effective_tokens(tokens: float, unique: int | None) -> float:
    """D' = U + U R* (1 - exp(-R / R*)) for `tokens` = U (1 + R) read from `unique` = U distinct tokens."""
    if not unique or tokens <= unique:
        return tokens
    repeats = tokens / unique - 1
    return unique * (1 + REPEAT_SCALE * (1 - math.exp(-repeats / REPEAT_SCALE)))


def unique_train_tokens(cfg: Config) -> int | None:
    """The training tokens of the run's prepared data (meta.json), or None where it is not known yet."""
    from .data.prepare import read_meta

    total = 0
    for d in cfg.data.data_dirs:
        try:
            total += int(read_meta(d)["splits"]["train"]["tokens"])
        except (CogniError, KeyError, TypeError, ValueError):
            return None
    return total or None


@dataclass(frozen=True)
class Candidate:
    depth: int
    model: ModelConfig
    params: int
    tokens_per_s: float
    tokens: int  # predicted in the budget
    memory: int  # training memory estimate, bytes
    fits: bool  # memory
    unique_tokens: int | None = None  # the training data's size, when known

    @property
    def epochs(self) -> float | None:
        return self.tokens / self.unique_tokens if self.unique_tokens else None

    @property
    def effective_tokens(self) -> float:
        """Fresh tokens that `tokens` read from `unique_tokens` (repeating them) are worth (see the module doc)."""
        return effective_tokens(self.tokens, self.unique_tokens)

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def predicted_loss(self) -> float:
        """Chinchilla's fitted loss at (N, D): comparable between candidates, not a loss of ours."""
        c = CHINCHILLA
        if self.tokens <= 0:
            return float("inf")
        return c["E"] + c["A"] / self.params ** c["alpha"] + c["B"] / self.effective_tokens ** c["beta"]


@dataclass(frozen=True)
class Plan:
    minutes: float
    device: str
    precision: str
    batch_size: int
    seq_len: int
    candidates: list[Candidate]
    chosen: Candidate
    measure_seconds: float

    @property
    def steps(self) -> int:
        return max(1, self.chosen.tokens // (self.batch_size * self.seq_len))

    def describe(self) -> str:
        c = self.chosen
        lines = [f"plan for {self.minutes:.3g} minutes on {self.device} ({self.precision}, batch {self.batch_size} x "
                 f"{self.seq_len}; {self.measure_seconds:.0f} s spent measuring):",
                 "  depth   params   tokens/s   tokens in budget   tokens/param   epochs   fit L(N,D)   memory"]
        for x in self.candidates:
            mark = "  <- chosen" if x is c else ("  (does not fit in memory)" if not x.fits else "")
            epochs = f"{x.epochs:.1f}" if x.epochs is not None else "?"
            lines.append(f"  {x.depth:>5} {x.params / 1e6:>7.2f}M {x.tokens_per_s:>10,.0f} {x.tokens:>18,} "
                         f"{x.tokens_per_param:>14.1f} {epochs:>8} {x.predicted_loss:>12.3f} "
                         f"{human_bytes(x.memory):>8}{mark}")
        finish = time.strftime("%H:%M", time.localtime(time.time() + self.minutes * 60))
        lines.append(f"chosen: depth {c.depth} (dim {c.model.dim}, {c.model.n_layers} layers, {c.model.n_heads}/"
                     f"{c.model.n_kv_heads} heads), {c.params:,} parameters, ~{c.tokens:,} tokens in ~{self.steps:,} "
                     f"steps, {human_bytes(c.memory)} to train; expected to finish about {finish}")
        return "\n".join(lines)


class _RandomBatches:
    """Endless random (x, y) batches: the timing does not depend on the data."""

    def __init__(self, batch: int, seq_len: int, vocab: int):
        self.batch, self.seq_len, self.vocab = batch, seq_len, vocab
        self.gen = torch.Generator().manual_seed(0)

    def __iter__(self):
        return self

    def __next__(self):
        ids = torch.randint(0, self.vocab, (self.batch, self.seq_len + 1), generator=self.gen)
        return ids[:, :-1], ids[:, 1:]


def measure(model_cfg: ModelConfig, cfg: Config, device: torch.device, seconds: float) -> tuple[float, str]:
    """(tokens per second, precision) of the Trainer's step for this model, timed after one warm-up step."""
    from .model import CogniMamba
    from .train import build_trainer

    torch.manual_seed(0)
    model = CogniMamba(model_cfg)
    train = replace(cfg.train, max_steps=10**9, max_minutes=None, compile=False, log_to=[])
    with tempfile.TemporaryDirectory(prefix="cogni-plan-") as tmp:
        trainer = build_trainer(model, _RandomBatches(train.batch_size, cfg.data.seq_len, model_cfg.vocab_size), None,
                                train, out_dir=Path(tmp), device=device, progress=False, log=lambda m: None)
        trainer.train_step()  # warm-up: allocator, kernels, optimizer state
        tokens, start = 0, time.perf_counter()
        while True:
            tokens += trainer.train_step().tokens
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                return tokens / elapsed, trainer.precision


def plan_for_budget(minutes: float, cfg: Config, device: torch.device, *, seconds_each: float = 3.0,
                    depths: tuple[int, ...] = DEPTHS, unique_tokens: int | None = None, say=lambda s: None) -> Plan:
    """Time the candidates from small to large and pick the lowest fitted loss (see the module doc).

    Timing stops at the first candidate that does not fit in memory, or once the fitted loss has
    risen twice in a row (it has one minimum along the ladder: more parameters, fewer tokens).
    `unique_tokens` (default: read from the prepared data's meta.json) discounts repeated data."""
    if not minutes > 0:
        raise CogniError(f"--minutes must be positive, got {minutes}.")
    start = time.perf_counter()
    budget_s = minutes * 60
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size * cfg.train.grad_accum
    free = free_memory(device)
    unique = unique_tokens if unique_tokens is not None else unique_train_tokens(cfg)
    candidates: list[Candidate] = []
    precision, rises = "fp32", 0
    for depth in depths:
        model_cfg = model_at_depth(depth, cfg.model.vocab_size, seq_len)
        params = param_counts(model_cfg).total
        memory = train_memory(model_cfg, cfg.train.batch_size, seq_len, mixed=cfg.train.precision != "fp32").total
        if memory > MEMORY_SHARE * free:
            candidates.append(Candidate(depth, model_cfg, params, 0.0, 0, memory, False, unique))
            break
        say(f"timing depth {depth} ({params / 1e6:.2f}M parameters) for {seconds_each:g} s ...")
        tok_s, precision = measure(model_cfg, cfg, device, seconds_each)
        left = budget_s - (time.perf_counter() - start)
        tokens = int(tok_s * max(0.0, left) * (1 - EVAL_SHARE))
        candidates.append(Candidate(depth, model_cfg, params, tok_s, tokens, memory, True, unique))
        fitted = [c for c in candidates if c.fits]
        rises = rises + 1 if len(fitted) > 1 and fitted[-1].predicted_loss > fitted[-2].predicted_loss else 0
        if rises >= 2 or left <= 0:
            break
    good = [c for c in candidates if c.fits and c.tokens >= MIN_STEPS * batch * seq_len]
    if not good:
        smallest = candidates[0]
        if not smallest.fits:
            raise CogniError(f"Even the smallest model (depth {smallest.depth}) needs {human_bytes(smallest.memory)} "
                             f"to train but {human_bytes(free)} is free; lower train.batch_size or data.seq_len.")
        raise CogniError(f"{minutes:g} minutes are too few for any model here: the smallest ({smallest.params:,} "
                         f"parameters) would get {smallest.tokens // (batch * seq_len)} steps of {batch} x {seq_len} "
                         f"tokens, under {MIN_STEPS}; give more minutes.")
    chosen = min(good, key=lambda c: c.predicted_loss)
    return Plan(minutes, str(device), precision, batch, seq_len, candidates, chosen, time.perf_counter() - start)


def apply_plan(cfg: Config, plan: Plan) -> Config:
    """The config with the planned model, and the time left of the budget as the run's time limit."""
    left = plan.minutes - plan.measure_seconds / 60
    if left <= 0:
        raise CogniError(f"Measuring took the whole {plan.minutes:g}-minute budget; give more minutes.")
    return replace(cfg, model=plan.chosen.model, preset=f"auto-depth{plan.chosen.depth}",
                   train=replace(cfg.train, max_minutes=left))
