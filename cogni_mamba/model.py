"""CogniMamba: a Llama-style decoder-only transformer.

Pre-norm blocks of RMSNorm -> grouped-query attention with rotary embeddings -> residual, then
RMSNorm -> SwiGLU feed-forward -> residual; a final RMSNorm and an LM head tied to the token
embedding. Parameter names follow Meta's Llama (`wq wk wv wo`, `w1 w2 w3`), and the rotary
embedding uses the half-split convention of Hugging Face's Llama, so the weights load into
`transformers.LlamaForCausalLM` with a plain key map.

Inference uses a preallocated `KVCache`: prefill the prompt, then feed one or more tokens at a
time. Rows may be left-padded (`KVCache.pad`), which the cache turns into per-row positions and
key masks so a padded row computes exactly what it would alone. The module does no I/O.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .device import free_memory
from .errors import CogniError

TABLE_CHECK_BYTES = 256 * 2**20  # rotary tables that take more than this while built are checked against free memory

IGNORE_INDEX = -100


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.type_as(x)


class Rotary(nn.Module):
    """Rotary position embeddings (no parameters); cos/sin tables are cached and grown on demand."""

    def __init__(self, head_dim: int, theta: float, max_len: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._extend(max_len)

    def _extend(self, length: int) -> None:
        need = 7 * length * self.inv_freq.numel() * 4  # peak bytes: freqs (L, D/2), emb, cos and sin (L, D), fp32
        if need > TABLE_CHECK_BYTES and need > free_memory(self.inv_freq.device):  # refused, not killed by the OS
            raise CogniError(f"The rotary tables for {length:,} positions (model.max_seq_len) need about "
                             f"{need / 2**30:,.1f} GiB while they are built, more than this machine has free; "
                             "lower model.max_seq_len.")
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (L, D): half-split layout, as in HF Llama
        self.cos, self.sin = emb.cos(), emb.sin()

    def forward(self, positions: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for integer positions (T,) or (B, T), all below `end` (given, to avoid a device sync)."""
        if end > self.cos.shape[0]:
            self._extend(max(end, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position; cos/sin are (T, D) or (B, T, D)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query per row, (B, H, 1, D), over (B, Hkv, S, D) keys and values (grouped heads share one),
    computed in fp32 (for these small products faster than bf16 on the CPU) and returned in q's dtype;
    `mask` (B or 1, 1, 1, S) marks the keys each row may see."""
    B, H, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q32, k32, v32 = q.float(), k.float(), v.float()
    scores = (q32.view(B, Hkv, H // Hkv, D) @ k32.transpose(-1, -2)).view(B, H, 1, S) * D ** -0.5  # (B, H, 1, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs.view(B, Hkv, H // Hkv, S) @ v32).view(B, H, 1, D).to(q.dtype)


class KVCache:
    """Preallocated keys and values for every layer: (n_layers, B, n_kv_heads, max_len, head_dim).

    `length` is the number of filled slots, shared by all rows. `pad` holds, per row, how many of
    its first slots are left padding; those slots are masked as keys and shift the row's positions.
    The model talks to a cache only through `positions`, `mask`, `update`, `advance` and `max_len`,
    so other layouts (the inference engine's `SlotCache`, with a length per row) plug in the same way.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, device=None, dtype=torch.float32,
                 pad: torch.Tensor | None = None):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per-layer views, made once
        self.max_len = max_len
        self.length = 0
        self.pad = None if pad is None or not bool(pad.any()) else pad.to(device=device, dtype=torch.long)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, Hkv, T, D) at the current slots; return the keys and values filled so far."""
        start, T = self.length, k.shape[2]
        keys, values = self.layers[layer]
        keys.narrow(2, start, T).copy_(k)  # narrow + copy_: fewer dispatches than slice assignment
        values.narrow(2, start, T).copy_(v)
        return keys.narrow(2, 0, start + T), values.narrow(2, 0, start + T)

    def advance(self, T: int) -> None:
        """Mark the T slots just written by `update` (every layer) as filled."""
        self.length += T

    def positions(self, T: int) -> torch.Tensor:
        """Rotary positions of the next T slots: (T,), or (B, T) when rows are padded."""
        if self.length + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; cannot add {T} to {self.length}.")
        slots = torch.arange(self.length, self.length + T, device=self.k.device)
        if self.pad is None:
            return slots
        return (slots[None, :] - self.pad[:, None]).clamp(min=0)

    def mask(self, T: int) -> torch.Tensor | None:
        """Boolean attention mask (B or 1, 1, T, length + T); None where plain causal masking is exact."""
        start = self.length
        if self.pad is None and (T == 1 or start == 0):
            return None
        q = torch.arange(start, start + T, device=self.k.device)[:, None]
        kpos = torch.arange(start + T, device=self.k.device)[None, :]
        allowed = kpos <= q  # (T, S) causal
        if self.pad is None:
            return allowed[None, None]
        valid = kpos[None] >= self.pad[:, None, None]  # (B, 1, S): not a pad slot
        # A padding query may see itself, so its (unused) softmax row is never empty.
        return ((allowed[None] & valid) | (kpos == q)[None])[:, None]


class Attention(nn.Module):
    """Grouped-query attention through scaled_dot_product_attention (flash / memory-efficient on GPU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.kv_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, mask=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = True
        if cache is not None:
            k, v = cache.update(layer, k.to(cache.k.dtype), v.to(cache.v.dtype))  # (B, Hkv, S, D)
            k, v = k.to(q.dtype), v.to(q.dtype)
            causal = mask is None and T > 1
        if cache is not None and T == 1 and q.dtype != torch.float32 and q.device.type == "cpu":
            y = decode_attention(q, k, v, mask)  # SDPA's bf16 CPU kernel is 1.5-6x slower for one query
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attention_norm(x), cos, sin, cache, layer, mask))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class CogniMamba(nn.Module):
    """The language model. `model(ids)` -> logits (B, T, V); `model(ids, targets)` -> (logits, loss)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.max_seq_len)
        self.fast_decode = None  # inference.precision.prepare_model may set a lean one-token step
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 / Llama initialisation: N(0, std), residual projections scaled by 1/sqrt(2 * n_layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)  # RMSNorm weights
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None, last_only: bool = False, return_logits: bool = True):
        """Logits for every position (or the last one); with `targets`, also the mean cross-entropy.

        With a cache, `input_ids` continue the sequence stored in it and the cache advances by T.
        Targets equal to -100 are ignored. `return_logits=False` (training) returns (None, loss)
        from `linear_cross_entropy`, which never holds the full (B, T, V) logits.
        """
        B, T = input_ids.shape
        if T == 1 and cache is not None and targets is None and self.fast_decode is not None \
                and self.fast_decode.supports(cache):
            return self.fast_decode(input_ids, cache)  # the same step with fewer ops (inference/fast_step.py)
        if cache is not None:  # positions() refuses T tokens beyond the cache's room
            positions, mask, end = cache.positions(T), cache.mask(T), cache.max_len
        else:
            positions, mask, end = torch.arange(T, device=input_ids.device), None, T
        cos, sin = self.rotary(positions, end)
        x = self.tok_embeddings(input_ids)  # (B, T, dim)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once here, not twice per layer in apply_rotary
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(x.flatten(0, 1), self.output.weight, targets.reshape(-1))
        logits = self.output(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None, *, pad: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache on this model's device (dtype defaults to the weights')."""
        weight = self.tok_embeddings.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, device=weight.device,
                       dtype=dtype or weight.dtype, pad=pad)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.tok_embeddings.weight.numel() if exclude_embeddings else n


# --- the training loss ----------------------------------------------------------------------------

LOSS_CHUNK_ELEMENTS = 2**25  # logits per chunk of the fused loss: 128 MiB in fp32


def _chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None,
                           grads: bool) -> tuple[torch.Tensor, ...]:
    """Sum of the cross-entropy of (h @ weight.T) and, with `grads`, d(sum)/dh and d(sum)/dweight in fp32.

    h: (N, dim), weight: (V, dim), targets: (N,). Logits exist one chunk of rows at a time, in fp32
    (chunk None: all rows at once, with no loop over N, which a dynamic N could not trace).
    """
    loss = torch.zeros((), device=h.device, dtype=torch.float32)
    grad_h = torch.empty(h.shape, device=h.device, dtype=torch.float32) if grads else None
    grad_w = torch.zeros(weight.shape, device=h.device, dtype=torch.float32) if grads else None
    for start in range(0, h.shape[0], chunk) if chunk is not None else [None]:
        rows = slice(start, start + chunk) if chunk is not None else slice(None)
        hc, tc = h[rows], targets[rows]  # (n, dim), (n,)
        logits = (hc @ weight.t()).float()  # (n, V)
        lse = torch.logsumexp(logits, dim=-1)  # (n,)
        valid = tc != IGNORE_INDEX
        safe = tc.clamp(min=0).unsqueeze(1)  # (n, 1): ignored rows point at class 0, then get weight 0
        loss = loss + ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
        if grads:
            g = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))  # minus the one-hot target
            g = (g * valid.unsqueeze(1)).to(h.dtype)  # entries in [-1, 1]: safe in fp16 before scaling
            grad_h[rows] = g @ weight
            grad_w += (g.t() @ hc).float()
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of h @ weight.T whose forward also computes the gradients (in chunks), so
    backward only scales them: nothing the size of the logits is kept for backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, dtype):
        total, grad_h, grad_w = _chunked_cross_entropy(h.to(dtype), weight.to(dtype), targets, chunk, grads=True)
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(grad_h / count, grad_w / count)
        ctx.dtypes = (h.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.dtypes[0]), (grad_w * grad_out).to(ctx.dtypes[1]), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T, targets, ignore_index=-100) without materialising the (N, V) logits.

    Matmuls run in autocast's dtype when autocast is on (as `nn.Linear` would), the softmax in fp32,
    and the gradients come back in h's and weight's own dtypes. Eagerly the logits are made a chunk
    of rows at a time; under torch.compile in one piece, so the graph does not depend on N (dynamic
    sequence lengths) and the compiler plans the memory.
    """
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    chunk = None if torch.compiler.is_compiling() else max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h, weight, targets, chunk, dtype)
        total, _, _ = _chunked_cross_entropy(h.to(dtype), weight.to(dtype), targets, chunk, grads=False)
        return total / (targets != IGNORE_INDEX).sum()
