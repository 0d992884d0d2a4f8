"""Naive references shared by several test files (written plainly, independent of the code under test)."""

from __future__ import annotations

import torch


@torch.no_grad()
def naive_greedy(model, prompt: list[int], n: int, *, stop_ids=(), penalty: float = 1.0) -> list[int]:
    """Argmax by full recomputation, no cache; stops at a stop id (not included), after n tokens, or
    when the sequence fills the context (the last token is predicted from a full context). `penalty`
    is the CTRL repetition penalty over every id seen so far (logits > 0 divided, others multiplied)."""
    ids, out = list(prompt), []
    while len(out) < n and len(ids) <= model.config.max_seq_len:
        logits = model(torch.tensor([ids]))[0, -1].double().tolist()
        if penalty != 1.0:
            for t in set(ids):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
        best = max(range(len(logits)), key=logits.__getitem__)
        if best in stop_ids:
            break
        out.append(best)
        ids.append(best)
    return out


def naive_reply(model, tok, messages: list[dict], n: int) -> str:
    """Greedy chat answer by full recomputation, no KV cache; it ends at <|end|>, EOS or any role token."""
    ids = list(tok.render_chat(messages, add_generation_prompt=True)[0])
    stops = {tok.end_id, tok.eos_id, *tok.role_ids.values()}
    return tok.decode(naive_greedy(model, ids, n, stop_ids=stops), skip_special=True)


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
