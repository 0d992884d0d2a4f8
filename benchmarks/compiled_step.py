"""Would a compiled decode step pay on this CPU? A probe, not a product path.

The model's one-token step written as one static-shape function (batch 1; the KV cache preallocated at
the model's context and written in place with index_copy_; attention over every slot with a mask),
with int8 weights: fbgemm's dynamic int8 product with fp32 activations (what we ship; its packed
weight is opaque to torch.compile, so a small custom op looks it up by index), or `--int8 weight-only`:
`torch._weight_int8pack_mm` with bf16 activations. Printed: inductor's compile time, then ms per step of that function eager
and compiled, and of the lean eager step we ship (`prepare_model(..., quantize="int8")`, fbgemm),
timed in turns on one thread (process CPU time, medians).

    .venv/bin/python benchmarks/compiled_step.py --preset nano              # Python wrapper
    .venv/bin/python benchmarks/compiled_step.py --preset nano --cpp-wrapper
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cogni_mamba.config import preset  # noqa: E402
from cogni_mamba.inference.precision import prepare_model  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402


def int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 rows, fp32 scales): symmetric, one scale per output row, as `Int8Linear` quantizes."""
    w32 = weight.detach().float()
    scale = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


PACKED: list = []  # fbgemm's packed weights, found by index from inside the compiled graph


def fbgemm_op():
    """`cogni_probe::fbgemm_linear(x, index)`: fbgemm's dynamic int8 product as an op torch.compile can call
    (its packed weight is an opaque object a graph cannot hold; the op looks it up by index)."""
    if hasattr(torch.ops.cogni_probe, "fbgemm_linear"):
        return torch.ops.cogni_probe.fbgemm_linear
    from cogni_mamba.inference.precision import INT8_REDUCE_RANGE

    lib = torch.library.Library("cogni_probe", "DEF")
    lib.define("fbgemm_linear(Tensor x, int index) -> Tensor")
    lib.impl("fbgemm_linear", lambda x, index: torch.ops.quantized.linear_dynamic(x, PACKED[index][0],
                                                                                  INT8_REDUCE_RANGE), "CPU")
    torch.library.register_fake("cogni_probe::fbgemm_linear", lambda x, index: x.new_empty(x.shape[0], PACKED[index][1]),
                                lib=lib)
    fbgemm_op.lib = lib  # keep the registration alive
    return torch.ops.cogni_probe.fbgemm_linear


def matmul_of(kind: str):
    """(quantize(weight) -> args, product(x, *args)) for the int8 kernel `kind`."""
    if kind == "weight-only":
        return (lambda weight: (int8(weight)[0], int8(weight)[1].to(torch.bfloat16))), torch._weight_int8pack_mm
    from cogni_mamba.inference.precision import Int8Linear

    op = fbgemm_op()

    def pack(weight):
        q = Int8Linear.from_quantized(*int8(weight))
        PACKED.append((q.packed, weight.shape[0]))
        return (len(PACKED) - 1,)

    return pack, op


def static_step(model: CogniMamba, kind: str = "weight-only"):
    """step(ids (1,), pos (1,), keys, values) -> logits (1, V); keys/values (L, 1, Hkv, S, D), written in place.

    kind "weight-only": int8 weights, bf16 activations (`torch._weight_int8pack_mm`); "fbgemm": fp32 activations."""
    quantize, product = matmul_of(kind)
    dtype = torch.bfloat16 if kind == "weight-only" else torch.float32
    cfg = model.config
    H, Hkv, D, S, F_ = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len, cfg.ffn_dim
    root = cfg.dim ** 0.5
    layers = []
    for b in model.layers:
        a, f = b.attention, b.feed_forward
        qkv = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]) * (b.attention_norm.weight * root)  # norms folded in
        w13 = torch.cat([f.w1.weight, f.w3.weight]) * (b.ffn_norm.weight * root)
        layers.append((quantize(qkv), quantize(a.wo.weight), quantize(w13), quantize(f.w2.weight)))
    head = quantize(model.output.weight)
    embedding = model.tok_embeddings.weight.detach().to(dtype)
    final = (model.norm.weight.detach() * root).to(dtype)
    half = D // 2
    cos_t = model.rotary.cos[:S].to(dtype)
    sin_t = torch.cat((-model.rotary.sin[:S, :half], model.rotary.sin[:S, half:]), -1).to(dtype)
    slots = torch.arange(S)

    def norm(x):
        return x / torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True).clamp_min(1e-30).to(x.dtype)

    def step(ids, pos, keys, values):
        x = F.embedding(ids, embedding)  # (1, dim)
        cos, sin = cos_t[pos].view(1, 1, D), sin_t[pos].view(1, 1, D)
        visible = (slots <= pos).view(1, 1, 1, S)
        for i, (wqkv, wo, w13, w2) in enumerate(layers):
            qkv = product(norm(x), *wqkv).view(1, H + 2 * Hkv, D)
            qk = qkv[:, :H + Hkv]
            qk = qk * cos + qk.view(1, H + Hkv, 2, half).flip(2).view(1, H + Hkv, D) * sin
            keys[i].index_copy_(2, pos, qk[:, H:, None])
            values[i].index_copy_(2, pos, qkv[:, H + Hkv:, None])
            q = qk[:, :H].float().view(1, Hkv, H // Hkv, D)
            scores = (q @ keys[i].float().transpose(-1, -2)) * D ** -0.5  # (1, Hkv, G, S)
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            y = (probs @ values[i].float()).to(x.dtype).reshape(1, H * D)
            x = x + product(y, *wo)
            gate_up = product(norm(x), *w13)
            x = x + product(F.silu(gate_up[:, :F_]) * gate_up[:, F_:], *w2)
        return product(norm(x) * final, *head)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--cpp-wrapper", action="store_true", help="inductor's C++ wrapper (no Python between kernels)")
    p.add_argument("--int8", choices=["fbgemm", "weight-only"], default="fbgemm",
                   help="fbgemm (fp32 activations, through a custom op) or weight-only (bf16 activations)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import torch._inductor.config as inductor

    inductor.cpp_wrapper = args.cpp_wrapper
    cfg = preset(args.preset).model
    torch.manual_seed(0)
    model = CogniMamba(dataclasses.replace(cfg, init_std=0.3)).eval()
    step = static_step(model, args.int8)
    dtype = torch.bfloat16 if args.int8 == "weight-only" else torch.float32
    shipped = prepare_model(_copy(model), torch.bfloat16, quantize="int8")
    shape = (cfg.n_layers, 1, cfg.n_kv_heads, cfg.max_seq_len, cfg.head_dim)
    keys, values = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    ids = torch.tensor([7])
    print(f"torch {torch.__version__}, {args.preset}, int8 {args.int8}, one thread, cpp_wrapper={args.cpp_wrapper}, "
          f"load {os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled = torch.compile(step, fullgraph=True, dynamic=False)
        compiled(ids, torch.tensor([0]), keys, values)
        print(f"compile: {time.perf_counter() - t0:.0f} s")
        cache = shipped.new_cache(1, cfg.max_seq_len)

        def run_shipped():
            cache.length = 0
            for _ in range(min(args.steps, cfg.max_seq_len)):
                shipped(ids[None], cache=cache)

        candidates = {"static step, eager": lambda: [step(ids, torch.tensor([k % cfg.max_seq_len]), keys, values)
                                                     for k in range(args.steps)],
                      "static step, compiled": lambda: [compiled(ids, torch.tensor([k % cfg.max_seq_len]), keys, values)
                                                        for k in range(args.steps)],
                      "lean eager step (shipped int8)": run_shipped}
        times = {name: [] for name in candidates}
        for r in range(args.repeats):
            for name in (list(candidates) if r % 2 == 0 else list(candidates)[::-1]):
                t0 = time.process_time()
                candidates[name]()
                steps = args.steps if "shipped" not in name else min(args.steps, cfg.max_seq_len)
                times[name].append((time.process_time() - t0) / steps * 1e3)
    for name, t in times.items():
        print(f"{name:<32} {statistics.median(t):.3f} ms per step")
    print(f"load at the end {os.getloadavg()[0]:.2f}")


def _copy(model: CogniMamba) -> CogniMamba:
    clone = CogniMamba(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


if __name__ == "__main__":
    main()
