"""CogniMamba against independent references: closed-form parameter counts, naive attention,
transformers' LlamaForCausalLM, and full recomputation for the KV cache."""

from __future__ import annotations

import math

import pytest
import torch

from cogni_mamba import CogniMamba, ModelConfig
from cogni_mamba.config import PRESETS, preset

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)


def closed_form_params(dim, n_layers, n_heads, n_kv_heads, vocab, hidden, tied=True):
    """Count written out by hand: embedding + blocks (q, k, v, o, w1, w2, w3, two norms) + final norm."""
    head_dim = dim // n_heads
    attn = dim * dim + 2 * dim * (n_kv_heads * head_dim) + dim * dim
    ffn = 3 * dim * hidden
    block = attn + ffn + 2 * dim
    return vocab * dim * (1 if tied else 2) + n_layers * block + dim


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts_match_closed_form(name):
    m = preset(name).model
    # hidden width written out: Llama's 2/3 * 4 * dim, rounded up to 256 (nano sets it explicitly)
    hidden = m.hidden_dim or 256 * math.ceil(int(8 * m.dim / 3) / 256)
    expected = closed_form_params(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, hidden)
    with torch.device("meta"):
        model = CogniMamba(m)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_medium_is_the_true_186m():
    m = preset("medium").model
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size) == (
        1024, 12, 16, 4, 64, 2816, 50304)
    assert closed_form_params(1024, 12, 16, 4, 50304, 2816) == 186_803_200


def test_nano_is_cpu_sized():
    m = preset("nano").model
    n = closed_form_params(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size, m.ffn_dim)
    assert 2e6 <= n <= 6e6 and m.vocab_size <= 8192


def test_causality():
    model = CogniMamba(ModelConfig(**SMALL)).eval()
    ids = torch.randint(0, 97, (2, 20))
    t = 9
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, 97, (2, 20 - t - 1))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


@pytest.mark.parametrize("chunks", [[1] * 16, [5, 1, 4, 6], [16]])
def test_kv_cache_matches_full_forward(chunks):
    model = CogniMamba(ModelConfig(**SMALL)).eval()
    ids = torch.randint(0, 97, (2, sum(chunks)))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 32)
        pieces, pos = [], 0
        for n in chunks:
            pieces.append(model(ids[:, pos:pos + n], cache=cache))
            pos += n
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=0)


def test_left_padded_rows_equal_unpadded():
    model = CogniMamba(ModelConfig(**SMALL)).eval()
    short, long = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    with torch.no_grad():
        cache = model.new_cache(2, 16, pad=torch.tensor([4, 0]))
        prefill = model(batch, cache=cache)
        step = model(torch.tensor([[7], [8]]), cache=cache)
        alone = model(torch.cat([short, torch.tensor([[7]])], 1))
    torch.testing.assert_close(prefill[0, 4:], alone[0, :5], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[0, 0], alone[0, 5], atol=1e-5, rtol=0)
    torch.testing.assert_close(prefill[1], model(long)[0], atol=1e-5, rtol=0)


def naive_attention(q, k, v):
    """softmax(Q K^T / sqrt(d) + causal mask) V, for (B, H, T, D) tensors."""
    T, d = q.shape[-2], q.shape[-1]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


def _attention_io(model, x):
    """Capture q, k, v (after rotary) and the attention output of layer 0 for input embeddings x."""
    from cogni_mamba.model import apply_rotary

    attn = model.layers[0].attention
    B, T, _ = x.shape
    cos, sin = model.rotary(torch.arange(T), T)
    q = apply_rotary(attn.wq(x).view(B, T, attn.n_heads, -1).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.wk(x).view(B, T, attn.n_kv_heads, -1).transpose(1, 2), cos, sin)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, -1).transpose(1, 2)
    out = attn(x, cos, sin)
    return q, k, v, out, attn


def test_mha_equals_naive_attention():
    model = CogniMamba(ModelConfig(**{**SMALL, "n_kv_heads": 4})).eval()
    x = torch.randn(2, 12, 64)
    q, k, v, out, attn = _attention_io(model, x)
    y = naive_attention(q, k, v).transpose(1, 2).reshape(2, 12, 64)
    torch.testing.assert_close(out, attn.wo(y), atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    model = CogniMamba(ModelConfig(**SMALL)).eval()
    x = torch.randn(2, 12, 64)
    q, k, v, out, attn = _attention_io(model, x)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # head h uses KV head h // rep
    y = naive_attention(q, k, v).transpose(1, 2).reshape(2, 12, 64)
    torch.testing.assert_close(out, attn.wo(y), atol=1e-5, rtol=1e-5)


def test_weight_tying_one_storage_gradients_from_both_uses():
    model = CogniMamba(ModelConfig(**SMALL))
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    ids = torch.randint(0, 97, (2, 8))
    # Gradient through the head alone (embedding lookup detached) and through the lookup alone.
    x = model.tok_embeddings(ids)
    head_only = model.output(x.detach()).sum()
    (g_head,) = torch.autograd.grad(head_only, model.output.weight)
    emb_only = (model.tok_embeddings(ids) * torch.randn(2, 8, 64)).sum()
    (g_emb,) = torch.autograd.grad(emb_only, model.tok_embeddings.weight)
    assert g_head.abs().sum() > 0 and g_emb.abs().sum() > 0
    model.zero_grad()
    _, loss = model(ids, ids)
    loss.backward()
    # the one parameter's gradient is the sum from both uses: rows of unused tokens get only the head part
    unused = torch.ones(97, dtype=torch.bool)
    unused[ids.unique()] = False
    assert model.tok_embeddings.weight.grad[unused].abs().sum() > 0
    assert model.tok_embeddings.weight.grad[~unused].abs().sum() > 0


def test_untied_embeddings_have_separate_head():
    model = CogniMamba(ModelConfig(**{**SMALL, "tie_embeddings": False}))
    assert model.output.weight.data_ptr() != model.tok_embeddings.weight.data_ptr()
    assert model.num_parameters() == closed_form_params(64, 2, 4, 2, 97, 96, tied=False)


def test_loss_equals_cross_entropy_and_ignores_minus_100():
    model = CogniMamba(ModelConfig(**SMALL))
    ids = torch.randint(0, 97, (2, 10))
    targets = ids.clone()
    targets[:, :4] = -100
    logits, loss = model(ids, targets)
    keep = targets != -100
    logp = torch.log_softmax(logits.double(), -1)
    expected = -logp[keep].gather(-1, targets[keep][:, None]).mean()
    assert abs(loss.item() - expected.item()) < 1e-5


def test_residual_projection_init_is_scaled():
    torch.manual_seed(1)
    cfg = ModelConfig(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=512)
    model = CogniMamba(cfg)
    wq_std = model.layers[0].attention.wq.weight.std().item()
    wo_std = model.layers[0].attention.wo.weight.std().item()
    assert abs(wq_std - 0.02) < 0.002
    assert abs(wo_std - 0.02 / math.sqrt(16)) < 0.0005


def test_rotary_tables_extend_beyond_max_seq_len():
    model = CogniMamba(ModelConfig(**{**SMALL, "max_seq_len": 8})).eval()
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 20)
        steps = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(20)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=0)


def _to_hf(model: CogniMamba):
    """Our weights in a transformers LlamaForCausalLM, through a plain key map."""
    transformers = pytest.importorskip("transformers")
    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, hidden_act="silu",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
             "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
             "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
             "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for key, value in model.state_dict().items():
        if key == "tok_embeddings.weight":
            sd["model.embed_tokens.weight"] = value
        elif key == "norm.weight":
            sd["model.norm.weight"] = value
        elif key == "output.weight":
            sd["lm_head.weight"] = value
        else:
            for ours, theirs in names.items():
                key = key.replace(ours, theirs)
            sd["model." + key] = value
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return hf


def test_logits_equal_transformers_llama():
    torch.manual_seed(3)
    model = CogniMamba(ModelConfig(**{**SMALL, "rope_theta": 500.0, "norm_eps": 1e-6})).eval()
    for p in model.parameters():  # norms away from 1 so their weights matter too
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    hf = _to_hf(model)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_sdpa_gradients_flow_to_every_parameter():
    model = CogniMamba(ModelConfig(**SMALL))
    ids = torch.randint(0, 97, (2, 8))
    _, loss = model(ids, ids)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_cache_overflow_is_an_error():
    model = CogniMamba(ModelConfig(**SMALL)).eval()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_dropout_only_in_training():
    model = CogniMamba(ModelConfig(**{**SMALL, "dropout": 0.5}))
    ids = torch.randint(0, 97, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids), model(ids))


def test_attention_under_bf16_autocast_matches_the_naive_reference():
    # The model's attention layer run as training runs it (bf16 autocast, GQA) against the naive softmax
    # attention in fp32 over q, k, v from the same bf16-rounded input: equal to within bf16 rounding.
    model = CogniMamba(ModelConfig(**SMALL)).eval()
    attn = model.layers[0].attention
    for w in (attn.wq.weight, attn.wk.weight):  # scores of order 1 and more: a peaked softmax, so the
        torch.nn.init.normal_(w, std=0.4)  # scale and the mask matter to the output
    x = torch.randn(2, 16, 64)
    cos, sin = model.rotary(torch.arange(16), 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x, cos, sin)
        q, k, v, _, _ = _attention_io(model, x.bfloat16().float())
        rep = attn.n_heads // attn.n_kv_heads
        y = naive_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))
        ref = attn.wo(y.transpose(1, 2).reshape(2, 16, 64))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
