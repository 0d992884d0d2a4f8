"""Inference precision: dtype selection against mocked hardware probes, and bf16 / int8 models
against an fp32 reference (logits within the format's rounding; greedy agreement reported)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cogni_mamba import CogniMamba, ModelConfig
from cogni_mamba.errors import CogniError
from cogni_mamba.inference import precision
from cogni_mamba.inference.precision import Int8Linear, prepare_model, resolve_inference_dtype
from tests.references import naive_greedy

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cpu_follows_the_native_bf16_probe(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_inference_dtype("auto", "cpu") == expected
    assert resolve_inference_dtype("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_asks_for_native_bf16_without_emulation(monkeypatch, native, expected):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["emulation"] = including_emulation
        return native or including_emulation  # an old GPU "supports" bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_inference_dtype("auto", "cuda") == expected
    assert asked["emulation"] is False


def test_explicit_names_and_other_devices(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert resolve_inference_dtype("bf16", "cpu") == torch.bfloat16  # asked for: given, even if emulated
    assert resolve_inference_dtype("fp32", "cpu") == torch.float32
    assert resolve_inference_dtype("auto", "meta") == torch.float32


@pytest.mark.parametrize("name", ["fp16", "float32", "", "BF16"])
def test_unknown_dtype_is_one_sentence(name):
    with pytest.raises(CogniError, match=r"^Unknown inference dtype .*; use auto, bf16 or fp32\.$"):
        resolve_inference_dtype(name, "cpu")


def test_unknown_quantization_is_an_error():
    with pytest.raises(CogniError, match="Unknown quantization 'int4'"):
        prepare_model(CogniMamba(ModelConfig(**SMALL)), torch.float32, quantize="int4")


def test_int8_off_the_cpu_is_one_sentence():
    """int8's products are CPU kernels (ours, fbgemm, and the weight-only op, which older torch lacks on CUDA)."""
    model = CogniMamba(ModelConfig(**SMALL)).to("meta")
    with pytest.raises(CogniError, match=r"int8 weights run on CPUs only .*not on meta; leave out --int8"):
        prepare_model(model, torch.bfloat16, quantize="int8")


def test_prepare_model_casts_weights_keeps_tying_and_fp32_rotary():
    model = CogniMamba(ModelConfig(**SMALL)).train()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_model(model, torch.bfloat16)
    assert not model.training
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.output.weight is model.tok_embeddings.weight
    assert model.rotary.cos.dtype == torch.float32 and model.rotary.inv_freq.dtype == torch.float32
    assert model.new_cache(2, 8).k.dtype == torch.bfloat16
    for name, p in model.named_parameters():  # round to nearest bf16, nothing else
        assert torch.equal(p, reference[name].to(torch.bfloat16)), name


def _agreement(a: list[int], b: list[int]) -> float:
    """Fraction of steps before the first difference (after it the two continue different texts)."""
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return first / len(a)


# int8 on an x86 CPU quantizes the activations too (fbgemm's dynamic int8, like llama.cpp's q8_0): ~0.085 on this
# random model, against ~0.06 for int8 weights with bf16 activations
@pytest.mark.parametrize("dtype, quantize, rel_tol", [(torch.bfloat16, None, 0.05), (torch.bfloat16, "int8", 0.1)])
def test_reduced_precision_logits_and_greedy_agreement_with_fp32(dtype, quantize, rel_tol, capsys):
    cfg = ModelConfig(**{**SMALL, "init_std": 0.3})
    torch.manual_seed(1)
    fp32 = CogniMamba(cfg).eval()
    low = CogniMamba(cfg)
    low.load_state_dict(fp32.state_dict())
    prepare_model(low, dtype, quantize=quantize)
    ids = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        ref, got = fp32(ids), low(ids).float()
    err = (got - ref).norm() / ref.norm()
    assert err < rel_tol, f"relative logit error {err:.4f}"
    rates = [_agreement(naive_greedy(fp32, p, 16), naive_greedy(low, p, 16)) for p in ids[:, :8].tolist()]
    with capsys.disabled():
        print(f"\n{dtype} quantize={quantize}: relative logit error {err:.4f}, greedy agreement with fp32 "
              f"(share of 16 tokens before the first difference) {[f'{r:.2f}' for r in rates]}")


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=False)
    q = Int8Linear(linear)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1, keepdim=True) / 127  # written out: symmetric, one scale per output row
    assert q.weight.dtype == torch.int8
    assert (q.dequantized() - w).abs().le(scale / 2 + 1e-7).all()  # rounding error at most half a step
    x = torch.randn(2, 3, 48)
    want = F.linear(x, q.dequantized())
    if q.packed is None and q.vnni is None:  # no int8 x int8 product: fp32 activations are multiplied exactly
        assert torch.allclose(q(x), want, atol=1e-5)
    else:  # ours / fbgemm quantize the activations to 8 bits: half a step of 1/255 of their range each
        assert (q(x) - want).norm() / want.norm() < 0.02
    xb = x.to(torch.bfloat16)  # the fast path: bf16 activations
    assert q(xb).dtype == torch.bfloat16
    assert torch.allclose(q(xb).float(), F.linear(xb.float(), q.dequantized()), rtol=0.02, atol=0.02)


def test_int8_replaces_every_linear_and_the_embedding_stays():
    model = prepare_model(CogniMamba(ModelConfig(**SMALL)), torch.bfloat16, quantize="int8")
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.fast_decode.fused.modules())
    rest = torch.float32 if precision.int8_takes_fp32() else torch.bfloat16  # the int8 x int8 products take fp32
    assert model.tok_embeddings.weight.dtype == rest
    assert isinstance(model.output, Int8Linear)
    cache = model.new_cache(1, 10)
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3]]), cache=cache, last_only=True)
    assert out.shape == (1, 1, 97) and cache.length == 3 and cache.k.dtype == rest


@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_naive_grouped_attention(masked):
    from cogni_mamba.model import decode_attention

    B, H, Hkv, S, D = 3, 8, 2, 11, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, S, D), torch.randn(B, Hkv, S, D)
    mask = torch.rand(B, 1, 1, S) > 0.4 if masked else None
    if mask is not None:
        mask[..., -1] = True  # every row sees at least its own key
    expected = torch.empty(B, H, 1, D)
    for b in range(B):  # written out: query head h reads key/value head h // (H / Hkv)
        for h in range(H):
            kv = h // (H // Hkv)
            scores = (k[b, kv] @ q[b, h, 0]) / D ** 0.5  # (S,)
            if mask is not None:
                scores = scores.masked_fill(~mask[b, 0, 0], float("-inf"))
            expected[b, h, 0] = torch.softmax(scores, dim=0) @ v[b, kv]
    assert torch.allclose(decode_attention(q, k, v, mask), expected, atol=1e-6)


def test_bf16_cached_decoding_follows_bf16_full_recomputation():
    """The bf16 decode path (one query, fp32 softmax) against the same bf16 model without a cache."""
    torch.manual_seed(2)
    model = prepare_model(CogniMamba(ModelConfig(**{**SMALL, "init_std": 0.3})), torch.bfloat16)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).float()  # (B, T, V)
        cache = model.new_cache(2, 12)
        model(ids[:, :6], cache=cache)
        steps = torch.cat([model(ids[:, t:t + 1], cache=cache).float() for t in range(6, 12)], dim=1)
    err = (steps - full[:, 6:]).norm() / full[:, 6:].norm()
    assert err < 0.03, f"relative logit error {err:.4f} (bf16 rounding is ~0.01)"


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_packed_bf16_linear_matches_fp32_products_and_keeps_the_state_dict():
    from cogni_mamba.inference.precision import PackedLinear

    model = CogniMamba(ModelConfig(**SMALL))
    keys = set(model.state_dict())
    prepare_model(model, torch.bfloat16)
    assert isinstance(model.layers[0].attention.wq, PackedLinear) and isinstance(model.output, PackedLinear)
    assert set(model.state_dict()) == keys and model.output.weight is model.tok_embeddings.weight
    layer = model.layers[0].feed_forward.w1
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    want = F.linear(x.float(), layer.weight.float())  # the same bf16 numbers, multiplied in fp32
    torch.testing.assert_close(layer(x).float(), want, rtol=0.02, atol=0.02)
