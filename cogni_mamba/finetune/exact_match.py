"""Exact-match evaluation of a chat model: greedy replies compared with the expected answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..inference import Engine, greedy_settings


def greedy_replies(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict]], *, max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The greedy reply to each conversation (rendered with a generation prompt), up to `<|end|>`.

    All of them go through one engine, `batch_size` rows at a time: a row that ends early is refilled
    with the next conversation at once.
    """
    if not prompts:
        return []
    ids = [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in prompts]
    room = max(len(p) for p in ids) + max_new_tokens  # cache rows only as long as the longest reply needs
    engine = Engine(model, max_batch=min(batch_size, len(ids)), max_queue=len(ids), bos_id=tokenizer.bos_id,
                    max_len=room)
    settings = greedy_settings(max_new_tokens)
    requests = [engine.submit(p, settings, stop_ids=tokenizer.chat_stop_ids) for p in ids]
    return [tokenizer.decode(list(r), skip_special=True) for r in requests]


def exact_match_rate(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, system: str | None = None,
                     **kwargs) -> float:
    """Share of (user prompt, expected reply) pairs whose greedy reply equals the expected one (stripped)."""
    if not pairs:
        return 0.0
    head = [{"role": "system", "content": system}] if system else []
    prompts = [[*head, {"role": "user", "content": prompt}] for prompt, _ in pairs]
    replies = greedy_replies(model, tokenizer, prompts, **kwargs)
    hits = sum(reply.strip() == expected.strip() for reply, (_, expected) in zip(replies, pairs, strict=True))
    return hits / len(pairs)
