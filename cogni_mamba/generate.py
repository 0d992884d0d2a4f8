"""Sampling, and a static-batch KV-cache decode loop. Token ids only.

Small pure steps, each testable alone: logits processing (repetition penalty, temperature, top-k,
top-p, min-p) -> probabilities -> sample -> prefill the prompt -> decode one token -> decode n
tokens (`decode_n`, a generator that yields each step of a fixed batch as it is made). Chat, the
server, `generate` and evaluation run on the continuous-batching engine (`cogni_mamba.inference`),
which uses the same filters per row; `decode_n` stays as the plain reference loop (benchmarks,
the export checks against transformers and llama.cpp).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Iterator, Sequence

import torch

from .config import GenerationConfig
from .errors import CogniError

NEG_INF = float("-inf")


class ContextOverflowError(CogniError):
    """A prompt longer than the model's context, when the caller asked for an error instead of trimming."""


# --- logits processing (pure functions on (B, V) float logits) -----------------------------------

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already present: positive logits are divided by it, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the top token always has mass_before == 0, so it is always kept
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least min_p times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, NEG_INF)


def process_logits(logits: torch.Tensor, settings: GenerationConfig, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Repetition penalty, then (when sampling) temperature, top-k, top-p and min-p, in Hugging Face's order."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits  # greedy: the filters cannot change the argmax
    logits = logits / settings.temperature
    if settings.top_k is not None:
        logits = top_k_filter(logits, settings.top_k)
    if settings.top_p is not None:
        logits = top_p_filter(logits, settings.top_p)
    if settings.min_p is not None:
        logits = min_p_filter(logits, settings.min_p)
    return logits


def sampling_candidates(logits: torch.Tensor, settings: GenerationConfig,
                        seen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """What `process_logits` leaves to draw from, cheaply: ((B, K) logits, with -inf where top-p / min-p drop a
    token; (B, K) their token ids). K is top_k when set (only those can survive, so top-p sorts K values, not the
    vocabulary), else V. The candidates are sorted from the most likely down when top-k or top-p needs an order,
    else left in vocabulary order (no sort at all). Same filters, same distribution.
    Without a repetition penalty, top-k runs on the logits as they come (bf16 ones too): widening to fp32 is exact
    and dividing by a positive temperature keeps the order, so only the k survivors are converted and divided
    (8 rows of GPT-2's 50,304 logits: a third of the time, most of which is the top-k itself)."""
    top_p = settings.top_p is not None and settings.top_p < 1.0
    if settings.top_k is not None and seen is None:
        values, ids = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1)  # sorted, descending
        values = values.float() / settings.temperature
    else:
        logits = logits.float()
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
        logits = logits / settings.temperature
        if settings.top_k is None and not top_p:
            values = logits
            ids = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
        else:
            k = min(settings.top_k or logits.shape[-1], logits.shape[-1])
            values, ids = torch.topk(logits, k, dim=-1)  # sorted, descending
    if top_p:
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(torch.cumsum(probs, dim=-1) - probs >= settings.top_p, NEG_INF)
    if settings.min_p is not None and settings.min_p > 0.0:
        probs = torch.softmax(values, dim=-1)
        values = values.masked_fill(probs < settings.min_p * probs.amax(dim=-1, keepdim=True), NEG_INF)
    return values, ids


def draw(values: torch.Tensor, ids: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One id per row from softmax(values) by the inverse CDF at `uniforms` ((B,) in [0, 1)): the first candidate
    whose cumulative probability passes u. One random number a row, so each row can bring its own generator."""
    cdf = torch.cumsum(torch.softmax(values, dim=-1), dim=-1)  # (B, K)
    at = torch.searchsorted(cdf, (uniforms.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1), right=True)
    return ids.gather(-1, at.clamp_max(ids.shape[-1] - 1)).squeeze(-1)


def sample(logits: torch.Tensor, settings: GenerationConfig, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next token per row, (B, V) logits -> (B,) ids: argmax at temperature 0, otherwise a draw."""
    if settings.temperature == 0:
        return process_logits(logits, settings, seen).argmax(dim=-1)
    values, ids = sampling_candidates(logits, settings, seen)
    return draw(values, ids, torch.rand(logits.shape[0], generator=generator, device=logits.device))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded torch.Generator (same seed -> same samples), or None to use torch's global one. Any integer seeds it:
    taken modulo 2**64 (torch's own range; a negative seed s is torch's 2**64 + s, as it would map it)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64)  # an API client's seed may be any JSON integer
    return generator


# --- prompts --------------------------------------------------------------------------------------

def fit_prompt(ids: Sequence[int], max_seq_len: int, max_new_tokens: int, *, bos_id: int | None = None,
               on_overflow: str = "warn") -> list[int]:
    """The prompt ready to prefill: BOS when empty; the most recent tokens when it leaves no room to generate.

    A prompt of max_seq_len tokens or more is cut to leave room for min(max_new_tokens, max_seq_len // 2)
    new tokens, with a warning, or raises ContextOverflowError when on_overflow == "error".
    """
    ids = list(ids)
    if not ids:
        if bos_id is None:
            raise CogniError("The prompt is empty and this tokenizer has no BOS token to start from; give a prompt.")
        return [bos_id]
    if len(ids) < max_seq_len:
        return ids
    keep = max_seq_len - max(1, min(max_new_tokens, max_seq_len // 2))
    message = (f"The prompt has {len(ids)} tokens but the model's context holds {max_seq_len}; "
               f"keeping its most recent {keep} tokens.")
    if on_overflow == "error":
        raise ContextOverflowError(f"The prompt has {len(ids)} tokens but the model's context holds {max_seq_len}; "
                                   "shorten the prompt.")
    warnings.warn(message, stacklevel=3)
    return ids[-keep:]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths -> (B, T) ids padded on the left, and (B,) padding counts."""
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    return ids, pad


# --- model steps ----------------------------------------------------------------------------------

def prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Run the (B, T) prompt through the model, filling the cache; logits of the last position (B, V)."""
    return model(ids, cache=cache, last_only=True)[:, -1]


def decode_one(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed one (B,) token per row; logits of the next position (B, V)."""
    return model(tokens[:, None], cache=cache, last_only=True)[:, -1]


@torch.inference_mode()
def decode_n(model, prompts: Sequence[Sequence[int]], settings: GenerationConfig | None = None, *,
             stop_ids: Iterable[int] = (), bos_id: int | None = None, pad_id: int = 0,
             on_overflow: str = "warn", generator: torch.Generator | None = None) -> Iterator[list[int | None]]:
    """Generate for a batch of prompts, yielding one list per step with the new token of each row.

    A row that met a stop id (the stop id itself is not yielded) or has finished gets None. The loop
    ends when every row has stopped, after max_new_tokens, or when the context is full. Rows of
    different lengths are left-padded; the cache masks the padding so each row computes what it would
    alone. `generator` defaults to one seeded with settings.seed (None: torch's global generator).
    """
    settings = settings or GenerationConfig()
    if not prompts:
        return
    max_seq_len = model.config.max_seq_len
    device = model.tok_embeddings.weight.device
    fitted = [fit_prompt(p, max_seq_len, settings.max_new_tokens, bos_id=bos_id, on_overflow=on_overflow)
              for p in prompts]
    ids, pad = left_pad(fitted, pad_id)
    ids, pad = ids.to(device), pad.to(device)
    B, T = ids.shape
    if generator is None:
        generator = make_generator(settings.seed, device)
    padded = pad if bool(pad.any()) else None  # rows of one length need no padding mask (and may take a compiled step)
    cache = model.new_cache(B, min(max_seq_len, T + settings.max_new_tokens), pad=padded)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    seen = None
    if settings.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        real = torch.arange(T, device=device)[None, :] >= pad[:, None]  # (B, T): not padding
        seen.scatter_(1, ids, real)
    done = torch.zeros(B, dtype=torch.bool, device=device)

    logits = prefill(model, ids, cache)
    for step in range(settings.max_new_tokens):
        tokens = sample(logits, settings, generator, seen)  # (B,)
        done |= torch.isin(tokens, stops)
        tokens = tokens.masked_fill(done, pad_id)  # finished rows are fed padding, never yielded
        yield [None if d else t for t, d in zip(tokens.tolist(), done.tolist(), strict=True)]
        if bool(done.all()) or step == settings.max_new_tokens - 1 or cache.length >= cache.max_len:
            return
        if seen is not None:
            seen.scatter_(1, tokens[:, None], ~done[:, None])
        logits = decode_one(model, tokens, cache)


def settings_with(base: GenerationConfig, **changes) -> GenerationConfig:
    """`base` with some sampling settings changed; an unknown name is a CogniError listing the valid ones."""
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    unknown = [k for k in changes if k not in names]
    if unknown:
        raise CogniError(f"Unknown generation setting {unknown[0]!r}; valid settings are: {', '.join(names)}.")
    return dataclasses.replace(base, **changes) if changes else base
