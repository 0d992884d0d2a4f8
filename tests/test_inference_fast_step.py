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


def _prefill_runs(model, use_engine_path: bool) -> list[torch.Tensor]:
    """One row's prompt in two chunks (the second on top of a cached prefix: an explicit mask), then two right-padded
    rows of different lengths together read at their own last positions (as the engine prefills arrivals), then one
    decode step of all three rows from the cache that left. Reference (use_engine_path False): the forward, each
    padded row alone and unpadded."""
    from cogni_mamba.inference.sampling import prefill_logits

    cache = SlotCache(model.config, 3, 32, dtype=model.tok_embeddings.weight.dtype)
    one = cache.view(0, 1)
    rows = torch.tensor([[3, 4, 5, 6, 0], [9, 8, 7, 0, 0]])  # right-padded to width 5: real lengths 4 and 3
    out = []
    with torch.inference_mode():
        for chunk in (torch.arange(1, 8)[None], torch.arange(20, 26)[None]):
            out.append(prefill_logits(model, chunk, one, None) if use_engine_path
                       else model(chunk, cache=one, last_only=True)[:, -1])
        if use_engine_path:
            out.append(prefill_logits(model, rows, cache.view(1, 3), [3, 2]))
        else:
            out.append(torch.cat([model(rows[r - 1:r, :n], cache=cache.view(r, r + 1), last_only=True)[:, -1]
                                  for r, n in ((1, 4), (2, 3))]))
        cache.set_length(1, 4)
        cache.set_length(2, 3)
        out.append(model(torch.tensor([[11], [12], [13]]), cache=cache.view(0, 3), last_only=True)[:, -1])
    return [o.float() for o in out]


def test_lean_prefill_computes_what_the_forward_computes():
    """The lean prefill's logic (positions, masks, padding, the rows' last positions, the cache it leaves) with
    fp32 weights folded as for bf16: equal to the forward up to the dropped norm eps."""
    from cogni_mamba.inference.fast_step import FastDecoder

    fast, plain = _pair(torch.float32)
    fast.fast_decode = FastDecoder(fast, exact=False)
    for got, want in zip(_prefill_runs(fast, True), _prefill_runs(plain, False), strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-3, atol=2e-3)  # a wrong position or mask: O(1)


@pytest.mark.parametrize("dtype, quantize", [(torch.bfloat16, None), (torch.float32, "int8")])
def test_reduced_prefill_follows_the_forward(dtype, quantize):
    """bf16 / int8 models prefill through the lean path: within rounding of the forward with the same weights (the
    bf16 chunk over a cached prefix differs by ~0.06 on this random model; the plain bf16 forward differs from
    fp32 there by ~0.04)."""
    fast, plain = _pair(dtype, quantize)
    assert not fast.fast_decode.exact
    for got, want in zip(_prefill_runs(fast, True), _prefill_runs(plain, False), strict=True):
        err = (got - want).norm() / want.norm()
        assert err < 0.1, f"relative logit error {err:.4f}"


def test_fp32_models_prefill_through_the_forward():
    from cogni_mamba.inference.sampling import prefill_logits

    fast, plain = _pair(torch.float32)
    ids = torch.randint(0, 97, (1, 9))
    with torch.inference_mode():
        got = prefill_logits(fast, ids, fast.new_cache(1, 16), None)
        want = plain(ids, cache=plain.new_cache(1, 16), last_only=True)[:, -1]
    assert torch.equal(got, want)
