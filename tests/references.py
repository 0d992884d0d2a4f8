"""Naive references shared by several test files (written plainly, independent of the code under test)."""

from __future__ import annotations

import torch


@torch.no_grad()
def naive_reply(model, tok, messages: list[dict], n: int) -> str:
    """Greedy chat answer by full recomputation, no KV cache; it ends at <|end|>, EOS or any role token."""
    ids = list(tok.render_chat(messages, add_generation_prompt=True)[0])
    stops, out = {tok.end_id, tok.eos_id, *tok.role_ids.values()}, []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        if nxt in stops:
            break
        out.append(nxt)
        ids.append(nxt)
    return tok.decode(out, skip_special=True)
