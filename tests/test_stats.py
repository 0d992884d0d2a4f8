"""Memory and FLOP estimates against sums written out by hand for a small config."""

from __future__ import annotations

from cogni_mamba import ModelConfig
from cogni_mamba.stats import flops_per_token, inference_memory, kv_cache_bytes, param_counts, train_memory

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96, max_seq_len=32)
# by hand: embedding 100*64; per block q,o 64*64 each, k,v 64*32 each, three SwiGLU 64*96, two norms of 64
BLOCK = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64
TOTAL = 100 * 64 + 2 * BLOCK + 64


def test_param_counts_by_part():
    p = param_counts(CFG)
    assert (p.embedding, p.per_block, p.total, p.non_embedding) == (6400, BLOCK, TOTAL, TOTAL - 6400)


def test_training_state_is_16_bytes_per_parameter_plus_casts_under_autocast():
    fp32, mixed = train_memory(CFG, 2, 16, mixed=False), train_memory(CFG, 2, 16, mixed=True)
    assert (fp32.weights, fp32.gradients, fp32.optimizer, fp32.weight_casts) == (4 * TOTAL, 4 * TOTAL, 8 * TOTAL, 0)
    assert mixed.weight_casts == 2 * TOTAL
    assert mixed.activations < fp32.activations
    assert fp32.total == 16 * TOTAL + fp32.activations


def test_kv_cache_and_inference_memory():
    # keys and values, 2 layers, batch 3, 10 tokens, 2 KV heads of 16, 2 bytes each
    assert kv_cache_bytes(CFG, 3, 10, 2) == 2 * 2 * 3 * 10 * 32 * 2
    assert inference_memory(CFG, 2) == (2 * TOTAL, 2 * 2 * 1 * 32 * 32 * 2)


def test_flops_per_token():
    matmul = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96) + 100 * 64  # blocks + LM head
    attention = 2 * 2 * 2 * 16 * 4 * 16  # QK^T and AV: 2 FLOPs x 2 products x layers x T x heads x head_dim
    forward, training = flops_per_token(CFG, 16)
    assert forward == 2 * matmul + attention and training == 3 * forward
