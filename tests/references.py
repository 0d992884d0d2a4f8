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


def logged_losses(run_dir) -> dict[int, float]:
    """step -> training loss from a run's metrics.jsonl, read plainly (a step logged twice fails)."""
    import json
    from pathlib import Path

    out: dict[int, float] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out
