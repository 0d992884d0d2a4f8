"""Exact-match evaluation of a chat model: greedy replies compared with the expected answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import GenerationConfig
from ..generate import decode_n


def greedy_replies(model: Any, tokenizer: Any, prompts: Sequence[Sequence[dict]], *, max_new_tokens: int = 32,
                   batch_size: int = 64) -> list[str]:
    """The greedy reply to each conversation (rendered with a generation prompt), up to `<|end|>`."""
    settings = GenerationConfig(temperature=0.0, max_new_tokens=max_new_tokens, top_k=None, top_p=None)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in prompts[start: start + batch_size]]
        rows: list[list[int]] = [[] for _ in chunk]
        for step in decode_n(model, chunk, settings, stop_ids=tokenizer.chat_stop_ids, bos_id=tokenizer.bos_id,
                             pad_id=tokenizer.pad_id):
            for row, token in zip(rows, step, strict=True):
                if token is not None:
                    row.append(token)
        replies += [tokenizer.decode(row, skip_special=True) for row in rows]
    return replies


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
