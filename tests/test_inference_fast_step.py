"""The lean one-token decode step (`inference.fast_step.FastDecoder`) against the model's own forward:
bit for bit in fp32 (plain, left-padded and slot caches), within rounding for bf16 and int8."""

from __future__ import annotations

import pytest
import torch

from cogni_mamba import CogniMamba, ModelConfig
from cogni_mamba.inference.cache import SlotCache
from cogni_mamba.inference.fast_step import fused_linear
from cogni_mamba.inference.precision import prepare_model

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64, init_std=0.3)


def _pair(dtype, quantize=None):
    """The same weights prepared twice: with the fast step, and with it turned off (the reference)."""
    torch.manual_seed(0)
    base = CogniMamba(ModelConfig(**SMALL))
    fast, plain = CogniMamba(ModelConfig(**SMALL)), CogniMamba(ModelConfig(**SMALL))
    fast.load_state_dict(base.state_dict())
    plain.load_state_dict(base.state_dict())
    prepare_model(fast, dtype, quantize=quantize)
    prepare_model(plain, dtype, quantize=quantize, fast_decode=False)
    assert fast.fast_decode is not None and plain.fast_decode is None
    return fast, plain


def _decode(model, cache, prompt: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Prefill `prompt`, then feed `steps` (B, n) one column at a time; the logits of every step, (B, n, V)."""
    with torch.inference_mode():
        model(prompt, cache=cache)
        return torch.cat([model(steps[:, t:t + 1], cache=cache, last_only=True) for t in range(steps.shape[1])], 1)


def _slot_decode(model) -> torch.Tensor:
    """Rows prefilled alone to lengths 5, 2 and 9 in one SlotCache, then four one-token steps together."""
    cache = SlotCache(model.config, 3, 32, dtype=model.tok_embeddings.weight.dtype)
    with torch.inference_mode():
        for row, n in enumerate((5, 2, 9)):
            model(torch.arange(1, n + 1)[None], cache=cache.view(row, row + 1))
        view = cache.view(0, 3)
        return torch.cat([model(torch.tensor([[7], [8], [9]]) + t, cache=view) for t in range(4)], 1).float()


def test_fused_linear_is_the_concatenation():
    torch.manual_seed(0)
    parts = [torch.nn.Linear(16, n, bias=False) for n in (8, 4, 4)]
    fused = fused_linear(parts)
    x = torch.randn(3, 16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    scale = torch.rand(16)
    assert torch.allclose(fused_linear(parts, scale)(x), torch.cat([p(x * scale) for p in parts], dim=-1), atol=1e-6)


@pytest.mark.parametrize("pad", [None, [0, 3]])
def test_fp32_step_is_bitwise_the_forward(pad):
    fast, plain = _pair(torch.float32)
    prompt, steps = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 5))
    pad_t = None if pad is None else torch.tensor(pad)
    got = _decode(fast, fast.new_cache(2, 16, pad=pad_t), prompt, steps)
    want = _decode(plain, plain.new_cache(2, 16, pad=pad_t), prompt, steps)
    assert torch.equal(got, want)


def test_fp32_step_on_a_slot_cache_with_rows_of_different_lengths_is_bitwise_the_forward():
    fast, plain = _pair(torch.float32)
    assert torch.equal(_slot_decode(fast), _slot_decode(plain))


@pytest.mark.parametrize("dtype, quantize, tol", [(torch.bfloat16, None, 0.05), (torch.float32, "int8", 0.05)])
def test_reduced_precision_step_follows_the_forward(dtype, quantize, tol):
    """bf16 / int8: the norms' weights are folded into the fused matmuls, so only rounding differs (bf16 against
    fp32 differs by ~0.03 on this random model)."""
    fast, plain = _pair(dtype, quantize)
    prompt, steps = torch.randint(0, 97, (2, 6)), torch.randint(0, 97, (2, 5))
    got = _decode(fast, fast.new_cache(2, 16), prompt, steps).float()
    want = _decode(plain, plain.new_cache(2, 16), prompt, steps).float()
    err = (got - want).norm() / want.norm()
    assert err < tol, f"relative logit error {err:.4f}"


def test_training_model_has_no_fast_step_and_prefill_keeps_the_forward():
    model = CogniMamba(ModelConfig(**SMALL))
    assert model.fast_decode is None
    fast, _ = _pair(torch.float32)
    calls = []
    original = fast.fast_decode.__class__.__call__

    class Counting(fast.fast_decode.__class__):
        def __call__(self, ids, cache):
            calls.append(ids.shape)
            return original(self, ids, cache)

    fast.fast_decode.__class__ = Counting
    cache = fast.new_cache(1, 16)
    with torch.inference_mode():
        fast(torch.tensor([[1, 2, 3]]), cache=cache)  # prefill: the ordinary forward
        fast(torch.tensor([[4]]), cache=cache)  # one token: the fast step
        fast(torch.tensor([[5]]))  # no cache: the ordinary forward
    assert calls == [torch.Size([1, 1])] and cache.length == 4


@pytest.mark.parametrize("dtype, quantize", [(torch.bfloat16, None), (torch.float32, "int8")])
def test_reduced_step_on_a_slot_cache_with_rows_of_different_lengths_follows_the_forward(dtype, quantize):
    fast, plain = _pair(dtype, quantize)
    got, want = _slot_decode(fast), _slot_decode(plain)
    err = (got - want).norm() / want.norm()
    assert err < 0.05, f"relative logit error {err:.4f}"
