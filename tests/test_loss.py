"""The training loss without logits: `model(x, y, return_logits=False)` against F.cross_entropy on the
model's own logits (the reference), and what it keeps for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cogni_mamba import model as model_module
from cogni_mamba.config import ModelConfig
from cogni_mamba.model import CogniMamba

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=96, max_seq_len=64)


def batch(B: int = 3, T: int = 20):
    x = torch.randint(0, CFG.vocab_size, (B, T))
    y = torch.randint(0, CFG.vocab_size, (B, T))
    y[0, :7] = -100  # ignored positions, as in chat fine-tuning
    y[2, -3:] = -100
    return x, y


def reference(model, x, y, autocast: bool):
    """Loss and gradients from the full logits through F.cross_entropy (fp32 softmax)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, CFG.vocab_size), y.reshape(-1), ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def fused(model, x, y, autocast: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, loss = model(x, y, return_logits=False)
    assert out is None
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_rows", [7, 10_000], ids=["chunks", "one-piece"])
def test_fused_loss_and_gradients_equal_cross_entropy_on_the_logits(monkeypatch, chunk_rows):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", chunk_rows * CFG.vocab_size)
    model = CogniMamba(CFG)
    x, y = batch()
    want_loss, want = reference(model, x, y, autocast=False)
    got_loss, got = fused(model, x, y, autocast=False)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)


def test_fused_loss_under_bf16_autocast_matches_within_bf16_rounding(monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 16 * CFG.vocab_size)
    model = CogniMamba(CFG)
    x, y = batch()
    want_loss, want = reference(model, x, y, autocast=True)
    got_loss, got = fused(model, x, y, autocast=True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-3, atol=1e-3)
    for name in want:  # the gradients land in the fp32 parameters, as autocast's own would
        assert got[name].dtype == torch.float32
        scale = float(want[name].abs().max())
        assert float((got[name] - want[name]).abs().max()) <= 0.02 * scale, name


def test_no_grad_loss_equals_the_reference_and_matches_the_logits_path():
    model = CogniMamba(CFG)
    x, y = batch()
    with torch.no_grad():
        _, a = model(x, y, return_logits=False)
        logits, b = model(x, y)
        ref = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), y.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b, ref, rtol=1e-6, atol=1e-6)


def saved_for_backward(fn) -> list[torch.Size]:
    """Shapes of every tensor autograd keeps for backward while `fn` runs."""
    shapes = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_training_loss_keeps_nothing_the_size_of_the_logits_for_backward(monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", 8 * CFG.vocab_size)
    model = CogniMamba(CFG)
    x, y = batch(4, 48)  # 192 tokens: their logits (98,304) outnumber the head's weights (32,768)
    logits_elements = x.numel() * CFG.vocab_size

    def biggest(**kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return max(s.numel() for s in saved_for_backward(lambda: model(x, y, **kw)))

    assert biggest() >= logits_elements  # the logits path keeps (B*T, V) log-probabilities
    assert biggest(return_logits=False) <= CFG.vocab_size * CFG.dim  # the head weight's gradient at most
