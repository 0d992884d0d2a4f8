"""Sizes, FLOPs and memory of a model, computed from its config alone (no weights are built).

These figures back `cogni-mamba info`; the seed's tables (about 6 GB to train medium at 4 x 512 in
fp16, about 500 MB to run it) come out of these formulas rather than being quoted.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig

GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding (shared with the LM head when tied)
    head: int  # untied LM head, else 0
    attention: int  # per block
    feed_forward: int  # per block
    norms: int  # per block
    final_norm: int
    n_layers: int

    @property
    def per_block(self) -> int:
        return self.attention + self.feed_forward + self.norms

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.n_layers * self.per_block + self.final_norm

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Parameter counts by part, from the architecture's shapes."""
    q_and_o = 2 * cfg.dim * cfg.n_heads * cfg.head_dim
    k_and_v = 2 * cfg.dim * cfg.kv_dim
    return ParamCounts(
        embedding=cfg.vocab_size * cfg.dim,
        head=0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim,
        attention=q_and_o + k_and_v,
        feed_forward=3 * cfg.dim * cfg.ffn_dim,
        norms=2 * cfg.dim,
        final_norm=cfg.dim,
        n_layers=cfg.n_layers,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(forward, training) FLOPs per token at context `seq_len`.

    Forward: 2 FLOPs per weight of every matmul (blocks and LM head; the embedding lookup is free),
    plus the attention scores and weighted sum, 2 * 2 * n_layers * seq_len * n_heads * head_dim
    (counted without the causal halving, as in the PaLM paper). Training = 3 x forward.
    """
    p = param_counts(cfg)
    matmul = cfg.n_layers * (p.attention + p.feed_forward) + cfg.vocab_size * cfg.dim
    attention = 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    forward = 2 * matmul + attention
    return forward, 3 * forward


def activation_bytes(cfg: ModelConfig, batch: int, seq_len: int, *, mixed: bool) -> int:
    """Estimated activations kept for backward at batch x seq_len, with a fused (flash) attention.

    Per token and block: the two norm inputs and outputs and the residual stream (kept in fp32
    under autocast), q, k, v and the attention output (twice: SDPA's output and wo's input), and
    SwiGLU's gate, up, silu(gate) and product. At the end, the training loss
    (`model.linear_cross_entropy`) keeps the fp32 gradients of the final hidden states and of the
    head instead of any logits, and while it runs holds one chunk of logits (fp32 and a 16-bit copy
    for its matmul) and, in mixed precision, a 16-bit copy of the head.
    """
    from .model import LOSS_CHUNK_ELEMENTS

    tokens = batch * seq_len
    small = 2 if mixed else 4  # bytes of a matmul output
    per_block = (4 * cfg.dim * 4  # norm inputs (fp32 residual stream) and rms terms, approximately
                 + small * (2 * cfg.dim  # norm outputs fed to the projections
                            + 3 * cfg.dim + 2 * cfg.kv_dim  # q, attention output (x2), k, v
                            + 4 * cfg.ffn_dim))  # gate, up, silu(gate), product
    head = cfg.vocab_size * cfg.dim
    chunk = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // cfg.vocab_size)) * cfg.vocab_size
    loss = 4 * tokens * cfg.dim + 4 * head + chunk * (4 + small) + (small * head if mixed else 0)
    return tokens * cfg.n_layers * per_block + loss


@dataclass(frozen=True)
class TrainMemory:
    weights: int
    gradients: int
    optimizer: int
    weight_casts: int  # autocast's 16-bit copies of the weights, kept for backward
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.weight_casts + self.activations


def train_memory(cfg: ModelConfig, batch: int, seq_len: int, *, mixed: bool) -> TrainMemory:
    """Training memory with AdamW: fp32 weights, gradients and two moments; autocast for `mixed`
    also holds a 16-bit copy of every weight from the forward pass to the backward pass."""
    n = param_counts(cfg).total
    return TrainMemory(weights=4 * n, gradients=4 * n, optimizer=8 * n, weight_casts=2 * n if mixed else 0,
                       activations=activation_bytes(cfg, batch, seq_len, mixed=mixed))


def kv_cache_bytes(cfg: ModelConfig, batch: int, length: int, bytes_per_value: int) -> int:
    """Keys and values for every layer at `length` tokens."""
    return 2 * cfg.n_layers * batch * length * cfg.kv_dim * bytes_per_value


def inference_memory(cfg: ModelConfig, bytes_per_value: int, batch: int = 1) -> tuple[int, int]:
    """(weights, KV cache at the full context) in bytes for inference at the given precision."""
    return param_counts(cfg).total * bytes_per_value, kv_cache_bytes(cfg, batch, cfg.max_seq_len, bytes_per_value)


def human_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"
