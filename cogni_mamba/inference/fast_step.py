"""A lean one-token decode step for prepared inference models.

The module-by-module forward pays a Python-level dispatch for every small op, which at nano size
costs more than the matmuls. `FastDecoder` computes the same step with fewer and larger calls:

- q/k/v as one matmul and gate/up as one (weights concatenated once: the same dot products, so
  the same bits in fp32);
- the rotary embedding from tables precomputed in the compute dtype: x * cos + swap(x) * sin',
  where swap exchanges the two halves and sin' carries the rotation's signs (the same products
  as `apply_rotary`);
- no dtype casts and no per-layer bookkeeping.

In fp32 (`exact=True`) that is all, and the step computes what the forward computes. For bf16 and
int8 weights, whose rounding is far larger, the norms' weights (times sqrt(dim)) are also folded
into the q/k/v and gate/up weights, so each norm is x / ||x|| (two ops instead of nine; the norm's
eps, 1e-5 of the mean square, is dropped).

It speaks the model's cache protocol (`positions`, `mask`, `update`, `advance`), so the static-batch
loop and the engine's slot cache both use it unchanged. `prepare_model` attaches one as
`model.fast_decode`; `CogniMamba.forward` hands it every one-token step with a cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model import CogniMamba, decode_attention


def fused_linear(linears: list[nn.Module], in_scale: torch.Tensor | None = None) -> nn.Linear:
    """One bias-free nn.Linear computing the concatenated outputs of `linears` (each input column times
    `in_scale` when given); prepare_model packs or quantizes it like the model's own."""
    weight = torch.cat([m.weight.detach() for m in linears])  # (sum of outs, in)
    if in_scale is not None:
        weight = (weight.float() * in_scale.float()[None, :]).to(weight.dtype)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def kernel(linear: nn.Module):
    """`linear` as a plain function of a 2-D input, skipping the module call: the kernel its kind runs
    (`PackedLinear` and `Int8Linear` say which through their own `kernel()`)."""
    if hasattr(linear, "kernel"):
        return linear.kernel()
    weight = linear.weight.detach()
    return lambda x: F.linear(x, weight)


class FastDecoder:
    """`decoder(ids, cache)` = `model(ids, cache=cache, last_only=True)` for (B, 1) ids, with fewer ops.

    Build it from the float model (before packing or quantizing); `fused` holds its own linears
    (q/k/v, gate/up per block), for prepare_model to convert like the model's.
    """

    def __init__(self, model: CogniMamba, *, exact: bool):
        cfg = model.config
        self.model = model  # wo, w2 and the head are the model's own modules, looked up at the first call
        self.n_heads, self.n_kv_heads, self.head_dim, self.eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
        self.exact = exact
        self.dtype = model.tok_embeddings.weight.dtype
        half = cfg.head_dim // 2
        cos, sin = model.rotary.cos, model.rotary.sin  # (L, D) fp32, half-split layout
        self.cos = cos.to(self.dtype)
        self.sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)  # swap(x) * this = rotate(x) * sin
        root = math.sqrt(cfg.dim)
        self.fused = nn.ModuleList()
        for block in model.layers:
            a, f = block.attention, block.feed_forward
            attn_scale = None if exact else block.attention_norm.weight.detach().float() * root
            ffn_scale = None if exact else block.ffn_norm.weight.detach().float() * root
            self.fused.append(nn.ModuleDict({"qkv": fused_linear([a.wq, a.wk, a.wv], attn_scale),
                                             "w13": fused_linear([f.w1, f.w3], ffn_scale)}))
        self.norm_scale = (model.norm.weight.detach().float() * root).to(self.dtype)
        self.cpu_low = self.dtype != torch.float32 and model.tok_embeddings.weight.device.type == "cpu"
        self._plan = self._head = None

    def supports(self, cache) -> bool:
        """True when this cache's rows fit the rotary tables and hold the weights' dtype."""
        return cache.max_len <= self.cos.shape[0] and cache.k.dtype == self.dtype

    def _layers(self) -> list[tuple]:
        """(norm weights, qkv, wo, w13, w2, ffn_dim) per block: plain references, looked up once."""
        if self._plan is None:
            self._plan = [(block.attention_norm.weight, block.ffn_norm.weight, kernel(fused["qkv"]),
                           kernel(block.attention.wo), kernel(fused["w13"]), kernel(block.feed_forward.w2),
                           block.feed_forward.w2.in_features)
                          for block, fused in zip(self.model.layers, self.fused, strict=True)]
            self._head = kernel(self.model.output)
        return self._plan

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)  # in fp32 the same bits as RMSNorm
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(1e-30)  # weight * sqrt(dim) folded

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits (B, 1, V) of the next position after feeding one (B, 1) token per row; the cache advances."""
        B = ids.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        positions = cache.positions(1).view(-1)  # (1,) or (B,)
        mask = cache.mask(1)
        cos = self.cos.index_select(0, positions).view(-1, 1, 1, D)  # (B|1, 1, 1, D)
        sin = self.sin.index_select(0, positions).view(-1, 1, 1, D)
        x = F.embedding(ids.view(B), self.model.tok_embeddings.weight)  # (B, dim)
        for i, (attention_norm, ffn_norm, qkv_proj, wo, w13, w2, ffn_dim) in enumerate(self._layers()):
            qkv = qkv_proj(self._norm(x, attention_norm)).view(B, H + 2 * Hkv, 1, D)
            qk = qkv.narrow(1, 0, H + Hkv)  # (B, H + Hkv, 1, D): queries and keys, rotated together
            swapped = qk.view(B, H + Hkv, 2, D // 2).flip(2).view(B, H + Hkv, 1, D)
            qk = (qk * cos).add_(swapped * sin)
            k, v = cache.update(i, qk.narrow(1, H, Hkv), qkv.narrow(1, H + Hkv, Hkv))  # (B, Hkv, S, D)
            q = qk.narrow(1, 0, H)  # (B, H, 1, D)
            if self.cpu_low:
                y = decode_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
            x = x + wo(y.reshape(B, H * D))
            gate_up = w13(self._norm(x, ffn_norm))  # (B, 2 * ffn_dim)
            x = x + w2(F.silu(gate_up[:, :ffn_dim]) * gate_up[:, ffn_dim:])
        cache.advance(1)
        if self.exact:
            x = self._norm(x, self.model.norm.weight)
        else:
            x = self._norm(x, None) * self.norm_scale
        return self._head(x).view(B, 1, -1)

    def prefill(self, ids: torch.Tensor, cache, last: list[int] | None = None) -> torch.Tensor:
        """Logits (B, V) after feeding (B, T) prompt tokens per row, with the same folded weights as the step
        (bf16 and int8 models only: fp32 prompts go through the forward, which this would not match bit for
        bit); taken at each row's position `last[b]` (right-padded rows), else at the last; the cache advances."""
        assert not self.exact, "fp32 prompts run through the model's forward"
        B, T = ids.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        positions = cache.positions(T)  # (T,) or (B, T)
        mask = cache.mask(T)  # None: every row starts empty, so plain causal attention is exact
        cos, sin = self.cos[positions], self.sin[positions]  # (T, D) or (B, T, D)
        cos, sin = (cos[:, None], sin[:, None]) if cos.dim() == 3 else (cos[None, None], sin[None, None])
        at = None if last is None else torch.tensor(last, device=ids.device)  # before the layers: no wait on a GPU
        x = F.embedding(ids.reshape(-1), self.model.tok_embeddings.weight)  # (B * T, dim)
        for i, (_, _, qkv_proj, wo, w13, w2, ffn_dim) in enumerate(self._layers()):
            qkv = qkv_proj(self._norm(x, None)).view(B, T, H + 2 * Hkv, D).transpose(1, 2)  # (B, H + 2Hkv, T, D)
            qk = qkv[:, :H + Hkv]
            swapped = qk.unflatten(-1, (2, D // 2)).flip(-2).flatten(-2)
            qk = qk * cos + swapped * sin
            k, v = cache.update(i, qk[:, H:], qkv[:, H + Hkv:])  # (B, Hkv, S, D)
            y = F.scaled_dot_product_attention(qk[:, :H], k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=Hkv != H)  # (B, H, T, D)
            x = x + wo(y.transpose(1, 2).reshape(B * T, H * D))
            gate_up = w13(self._norm(x, None))
            x = x + w2(F.silu(gate_up[:, :ffn_dim]) * gate_up[:, ffn_dim:])
        cache.advance(T)
        x = x.view(B, T, -1)
        x = x[:, -1] if at is None else x[torch.arange(B, device=x.device), at]
        return self._head(self._norm(x, None) * self.norm_scale)  # (B, V)

