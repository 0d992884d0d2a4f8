"""A compiled one-token decode step for batch 1 (CPU): the lean step as one static-shape graph.

At nano size the eager step is op-overhead bound (~150 op calls of a few microseconds each, and
fbgemm's int8 product quantizes its activations in every call); a graph that inductor compiles to C++
(`cpp_wrapper`: no Python between the kernels) removes that overhead. The step is written as a pure
function of tensors, so one graph serves every position:

- inputs: the token (1,), its position (1,), and the whole KV cache's keys and values
  (n_layers, rows, n_kv_heads, S, head_dim), read only; row 0 is the one decoded;
- attention runs over all S slots of the row with a mask (slot < position) plus the new key, in fp32;
  the new keys and values come out of the graph and are written in two ops after it (a write into the
  cache inside the graph made inductor copy the whole cache input once per layer);
- the rest is `FastDecoder`'s step: fused q/k/v and gate/up, the norms' weights folded into them
  (norm eps dropped), rotary from tables.

Weights: with int8 (`prepare_model(..., quantize="int8")`) the graph multiplies bf16 activations by the
same int8 rows and per-row scales as `Int8Linear` (`torch._weight_int8pack_mm`, weight-only: no
per-call activation quantization); otherwise plain products in the model's dtype, with inductor's
freezing (bf16 weights packed once for oneDNN).

`CompiledDecoder` wraps the model's `FastDecoder`: batch-1 steps on row 0 of a cache go through the
graph (compiled at the first such step, again for a new cache shape), every other step through the
eager lean step.
"""

from __future__ import annotations

import shutil
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class StaticStep(nn.Module):
    """step(ids (1,), pos (1,), keys, values) -> (logits (1, V), or the final hidden state (1, dim) when the head
    runs outside (`head=False`); the new keys and values (L, Hkv, D) for row 0's slot `pos`). keys/values are
    the cache's (L, R, Hkv, S, D); row 0's slots before `pos` are attended to, none is written."""

    def __init__(self, decoder, *, head: bool = True):
        super().__init__()
        from .precision import Int8Linear

        model = decoder.model
        cfg = model.config
        self.H, self.Hkv, self.D, self.ffn_dim, self.n_layers = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                                                 cfg.ffn_dim, cfg.n_layers)
        self.int8 = isinstance(model.output, Int8Linear)
        self.dtype = torch.bfloat16 if self.int8 else decoder.dtype  # the activations'
        self.head = head
        linears = {"head": model.output} if head else {}
        for i, (block, fused) in enumerate(zip(model.layers, decoder.fused, strict=True)):
            linears.update({f"qkv{i}": fused["qkv"], f"wo{i}": block.attention.wo, f"w13{i}": fused["w13"],
                            f"w2{i}": block.feed_forward.w2})
        for name, linear in linears.items():
            if self.int8:
                self.register_buffer(name + "_w", linear.weight, persistent=False)
                self.register_buffer(name + "_scale", linear.scale.to(self.dtype), persistent=False)
            else:
                self.register_buffer(name + "_w", linear.weight.detach(), persistent=False)
        self.exact = decoder.exact  # fp32 without int8: the norms' weights are not folded into the products
        if self.exact:
            root = cfg.dim ** 0.5
            for i, block in enumerate(model.layers):
                self.register_buffer(f"an{i}", (block.attention_norm.weight.detach() * root).to(self.dtype),
                                     persistent=False)
                self.register_buffer(f"fn{i}", (block.ffn_norm.weight.detach() * root).to(self.dtype),
                                     persistent=False)
        self.register_buffer("embedding", model.tok_embeddings.weight.detach().to(self.dtype), persistent=False)
        self.register_buffer("final", decoder.norm_scale.to(self.dtype), persistent=False)
        self.register_buffer("cos", decoder.cos.to(self.dtype), persistent=False)
        self.register_buffer("sin", decoder.sin.to(self.dtype), persistent=False)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.int8:
            return torch._weight_int8pack_mm(x, getattr(self, name + "_w"), getattr(self, name + "_scale"))
        return F.linear(x, getattr(self, name + "_w"))

    def _norm(self, x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        """x / ||x||, times the norm's weight (times sqrt(dim)) where it is not folded into the next product."""
        x32 = x.float()
        x = (x32 / torch.linalg.vector_norm(x32, dim=-1, keepdim=True).clamp_min(1e-30)).to(x.dtype)
        return x * getattr(self, f"{which}{layer}") if self.exact and which else x

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, Hkv, D = self.H, self.Hkv, self.D
        S = keys.shape[3]
        x = F.embedding(ids, self.embedding)  # (1, dim)
        cos, sin = self.cos[pos].view(1, 1, D), self.sin[pos].view(1, 1, D)
        earlier = (torch.arange(S, device=ids.device) < pos).view(1, 1, S)  # the row's filled slots
        new_keys, new_values = [], []
        for i in range(self.n_layers):
            qkv = self._linear(f"qkv{i}", self._norm(x, i, "an")).view(1, H + 2 * Hkv, D)
            qk = qkv[:, :H + Hkv]
            qk = qk * cos + qk.view(1, H + Hkv, 2, D // 2).flip(2).view(1, H + Hkv, D) * sin
            k_new, v_new = qk[0, H:].to(keys.dtype), qkv[0, H + Hkv:].to(values.dtype)  # (Hkv, D)
            new_keys.append(k_new)
            new_values.append(v_new)
            # attention over the cached slots and the new key, which the caller writes at `pos` afterwards
            # (written inside the graph, the cache input's mutation costs a copy of it per layer)
            q = qk[0, :H].float().view(Hkv, H // Hkv, D)
            k_row, v_row = keys[i, 0].float(), values[i, 0].float()  # (Hkv, S, D)
            scores = torch.cat([(q @ k_row.transpose(-1, -2)).masked_fill(~earlier, float("-inf")),
                                (q * k_new.float()[:, None]).sum(-1, keepdim=True)], dim=-1) * D ** -0.5
            probs = torch.softmax(scores, dim=-1)  # (Hkv, G, S + 1)
            y = probs[..., :S] @ v_row + probs[..., S:] * v_new.float()[:, None]
            x = x + self._linear(f"wo{i}", y.to(x.dtype).reshape(1, H * D))
            gate_up = self._linear(f"w13{i}", self._norm(x, i, "fn"))
            x = x + self._linear(f"w2{i}", F.silu(gate_up[:, :self.ffn_dim]) * gate_up[:, self.ffn_dim:])
        x = self._norm(x, 0, "") * self.final
        return self._linear("head", x) if self.head else x, torch.stack(new_keys), torch.stack(new_values)


def compile_unavailable(device: torch.device) -> str | None:
    """Why the compiled step cannot run here (one sentence), or None when it can."""
    if device.type != "cpu":
        return f"the compiled decode step is built for CPUs only, not {device.type}"
    from torch._inductor import config as inductor

    compiler = inductor.cpp.cxx[1] if isinstance(inductor.cpp.cxx, tuple) else inductor.cpp.cxx
    if shutil.which(compiler or "g++") is None:
        return f"no C++ compiler ({compiler or 'g++'}) was found on PATH, which torch.compile needs on a CPU"
    return None


class CompiledDecoder:
    """A `FastDecoder` whose batch-1 steps on a cache's row 0 run as one compiled graph (`StaticStep`).

    `model(ids, cache=...)` reaches it like the eager step (`model.fast_decode`); steps of several rows, or
    of a row other than 0, take the eager step. The graph is compiled at its first step (tens of seconds
    to two minutes on one core; inductor caches its work on disk, so a later process is faster) and again
    for a cache of another shape. Where compiling fails, one warning says why and decoding stays eager.
    """

    def __init__(self, decoder, *, head_outside: bool = False):
        self.eager = decoder
        self.model = decoder.model
        self.head = None
        if head_outside:  # e.g. fbgemm's int8 head, 3x faster than the weight-only kernel at GPT-2's vocabulary
            from .fast_step import kernel

            self.head = kernel(self.model.output)
        self.step = StaticStep(decoder, head=not head_outside)
        self.compiled = None
        self.failed: str | None = compile_unavailable(self.model.tok_embeddings.weight.device)
        self.compile_seconds: float | None = None

    def supports(self, cache) -> bool:
        return self.eager.supports(cache)

    def _row0(self, ids: torch.Tensor, cache) -> bool:
        if ids.shape[0] != 1 or self.failed:
            return False
        start = getattr(cache, "start", 0)
        return start == 0 and getattr(cache, "pad", None) is None and cache.k.dtype == self.eager.dtype

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        if not self._row0(ids, cache):
            return self.eager(ids, cache)
        pos = cache.positions(1).view(1)  # refuses a full cache
        try:
            if self.compiled is None:
                t0 = time.perf_counter()
                options = {"cpp_wrapper": True, "freezing": not self.step.int8}
                self.compiled = torch.compile(self.step, fullgraph=True, options=options)
                out, k, v = self.compiled(ids.view(1), pos, cache.k, cache.v)  # compiles here
                self.compile_seconds = time.perf_counter() - t0
            else:
                out, k, v = self.compiled(ids.view(1), pos, cache.k, cache.v)
        except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op: any failure means eager
            self._give_up(error)
            return self.eager(ids, cache)
        cache.k[:, 0].index_copy_(2, pos, k[:, :, None])  # (L, Hkv, S, D) at slot pos
        cache.v[:, 0].index_copy_(2, pos, v[:, :, None])
        cache.advance(1)
        if self.head is not None:
            out = self.head(out.to(self.eager.dtype))
        return out.view(1, 1, -1).to(self.eager.dtype)

    def _give_up(self, error: BaseException) -> None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.failed = f"compiling the decode step failed ({first[:200]})"
        warnings.warn(f"{self.failed}; decoding runs the eager step.", stacklevel=3)
