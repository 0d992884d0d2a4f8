"""Next tokens for a batch of rows that each carry their own sampling settings (one engine step), and the
logits they are drawn from.

Rows with equal settings are processed together (their slice of the logits filtered at once); a sampled
row draws its one uniform number from its own generator, so a seeded request gives the same tokens in any
batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import GenerationConfig
from ..generate import draw, process_logits, sampling_candidates


def logits_at(model, ids: torch.Tensor, cache, positions: Sequence[int]) -> torch.Tensor:
    """(B, V) logits of `model(ids, cache=cache)` at one position per row (right-padded prompts: each row's last
    real token). The output layer sees only those B positions, not all B x T (a quarter of a nano prefill's work)."""
    rows = torch.arange(len(positions), device=ids.device)
    at = torch.tensor(positions, device=ids.device)
    handle = model.output.register_forward_pre_hook(lambda _, args: (args[0][rows, at][:, None],))
    try:
        return model(ids, cache=cache)[:, 0]
    finally:
        handle.remove()


def prefill_logits(model, ids: torch.Tensor, cache, last: Sequence[int] | None) -> torch.Tensor:
    """(B, V) logits after a chunk of (B, T) prompt tokens: at each row's position `last[b]` (right-padded rows),
    else at the last. bf16 and int8 models prefill through their lean step's weights (`FastDecoder.prefill`:
    fused q/k/v and gate/up, folded norms, about half the op calls); fp32 ones through the forward, exactly."""
    fast = getattr(model, "fast_decode", None)
    if fast is not None and not fast.exact and ids.shape[1] > 1 and fast.supports(cache):
        return fast.prefill(ids, cache, None if last is None else list(last))
    if last is None:
        return model(ids, cache=cache, last_only=True)[:, -1]
    return logits_at(model, ids, cache, last)


def pick_tokens(logits: torch.Tensor, settings: Sequence[GenerationConfig], seen: Sequence[torch.Tensor | None],
                generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` (n, V): row j with settings[j], seen[j] ((V,) bool, the tokens in its
    context, for the repetition penalty) and generators[j] (None: torch's global generator)."""
    chosen = [0] * len(settings)
    by_settings: dict[tuple, list[int]] = {}
    for j, s in enumerate(settings):
        by_settings.setdefault((s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty), []).append(j)
    for members in by_settings.values():
        s = settings[members[0]]
        if len(members) < len(settings):
            group_logits = logits[torch.tensor(members, device=logits.device)]
        else:
            group_logits = logits  # one set of settings for the whole batch (the usual case): no gather
        group_seen = torch.stack([seen[j] for j in members]) if s.repetition_penalty != 1.0 else None
        if s.temperature == 0:
            picks = process_logits(group_logits, s, group_seen).argmax(dim=-1).tolist()
        else:  # one uniform number per row from the row's own generator, then one batched draw
            values, ids = sampling_candidates(group_logits, s, group_seen)
            uniforms = torch.rand(len(members))  # unseeded rows: one call to torch's global generator for all
            for k, j in enumerate(members):
                if generators[j] is not None:  # a seeded row draws from its own generator, the same in any batch
                    uniforms[k] = torch.rand(1, generator=generators[j], device=generators[j].device)[0]
            picks = draw(values, ids, uniforms.to(values.device)).tolist()
        for k, j in enumerate(members):
            chosen[j] = picks[k]
    return chosen
