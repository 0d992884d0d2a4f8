"""Correctness checks of the fused / low-precision paths, for `scripts/gpu_check.sh` (plain Python:
no pytest needed, so it runs on a bare GPU image). Each subcommand prints its numbers and ends with
`PASS` or `FAIL: reason` (exit status 0 or 1).

    python3 scripts/cuda_checks.py precision --preset medium --batch 4 --seq-len 512 --steps 8
        bf16 and fp16 training losses against fp32 (IEEE, no TF32) from the same weights and batches;
        fp16 rows give the final loss scale and the steps the GradScaler skipped.
    python3 scripts/cuda_checks.py attention --preset medium --batch 4 --seq-len 512
        SDPA as dispatched (which kernel ran, named from the profiler) against the math kernel, forward
        and backward, with the model's grouped-query shapes, in bf16 and fp16; fp32 math is the reference.
        Then the whole model's loss and gradients with the dispatched kernel against the math kernel.
    python3 scripts/cuda_checks.py dist --device cuda
        DDP and FSDP2 (fp32, and bf16 with its mixed-precision policy) over a process group of one
        against plain training with the trainer: losses, and the dtype FSDP computes with.
    python3 scripts/cuda_checks.py graphs --steps 64 --device cuda
        The engine's decode steps replayed as CUDA graphs (`--compile` on a GPU) against the same step
        called directly (tokens must agree) and the eager lean step: tokens/s at nano and tiny, batch 1 / 8 / 32;
        then four sampled rows with the same settings, one seeded, that must each run to their budget.

`--device cpu` runs the same code on a CPU (fp16 is skipped there), at the sizes the dry run uses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks", REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from common import RunSpec, bench_trainer, model_config  # noqa: E402

from cogni_mamba.model import CogniMamba  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def counting_batches(vocab: int, batch: int, seq_len: int, n: int, device: torch.device, seed: int = 0):
    """Learnable tokens (each row counts up from a random start, 10% noise), so the loss falls in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        rows = (torch.randint(0, vocab, (batch, 1), generator=g) + torch.arange(seq_len + 1)) % vocab
        noise = torch.randint(0, vocab, rows.shape, generator=g)
        rows = torch.where(torch.rand(rows.shape, generator=g) < 0.1, noise, rows)
        out.append((rows[:, :-1].to(device), rows[:, 1:].to(device)))
    return out


def precisions_here(device: torch.device) -> list[str]:
    return ["bf16", "fp16"] if device.type == "cuda" else ["bf16"]


# --- bf16 / fp16 training losses against fp32 -------------------------------------------------------

def check_precision(args, device: torch.device) -> list[str]:
    spec = RunSpec(preset=args.preset, seq_len=args.seq_len)
    cfg = model_config(spec)
    torch.manual_seed(0)
    init = CogniMamba(cfg).state_dict()
    batch = counting_batches(cfg.vocab_size, args.batch, args.seq_len, 1, device)[0]  # one batch, repeated:
    losses, problems = {}, []  # the loss must fall, and every precision sees the same steps
    for precision in ["fp32", *precisions_here(device)]:
        model = CogniMamba(cfg).to(device)
        model.load_state_dict(init)
        trainer = bench_trainer(model, [batch], precision, device, lr=1e-3)  # the Trainer's own step
        if precision == "fp32":
            torch.set_float32_matmul_precision("highest")  # the reference: IEEE fp32, no TF32
        outcomes = [trainer.train_step() for _ in range(args.steps)]
        losses[precision] = [o.loss for o in outcomes]
        torch.set_float32_matmul_precision("high" if device.type == "cuda" else "highest")
        skipped = sum(not o.applied for o in outcomes)
        extra = f"; loss scale {trainer.scaler.get_scale():g}, skipped steps {skipped}" if precision == "fp16" else ""
        print(f"{precision}: losses {' '.join(f'{x:.4f}' for x in losses[precision])}{extra}", flush=True)
        del model, trainer
    ref = losses["fp32"]
    for precision in precisions_here(device):
        rel = [abs(a - b) / abs(b) for a, b in zip(losses[precision], ref, strict=True)]
        print(f"{precision} vs fp32: first-step relative difference {rel[0]:.2e}, largest {max(rel):.2e}")
        if rel[0] > 5e-3 or max(rel) > 3e-2:
            problems.append(f"{precision} loss differs from fp32 by {max(rel):.1%}")
    if ref[-1] >= ref[0]:
        problems.append(f"the fp32 loss did not fall ({ref[0]:.4f} -> {ref[-1]:.4f})")
    return problems


# --- fused attention against the math kernel ---------------------------------------------------------

def kernel_that_ran(fn) -> str:
    """Which SDPA kernel `fn` dispatched to, read from the profiler's operator names."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        fn()
    names = " ".join(e.key for e in prof.key_averages()).lower()
    for key, label in (("flash", "flash"), ("efficient", "memory-efficient"), ("cudnn", "cudnn")):
        if key in names:
            return label
    return "math"


def attention_grads(q, k, v, backend=None):
    """Output and the gradients of q, k, v for a fixed random output gradient."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ctx = sdpa_kernel(backend) if backend is not None else torch.enable_grad()
    with ctx:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(g)
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def max_err(got, want) -> float:
    return max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, want, strict=True))


def check_attention(args, device: torch.device) -> list[str]:
    from torch.nn.attention import SDPBackend

    cfg = model_config(RunSpec(preset=args.preset, seq_len=args.seq_len))
    B, T, H, Hkv, D = args.batch, args.seq_len, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    print(f"shapes: q ({B}, {H}, {T}, {D}), k/v ({B}, {Hkv}, {T}, {D}), causal, enable_gqa={Hkv != H}")
    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(B, h, T, D, generator=g).to(device) for h in (H, Hkv, Hkv))
    ref = attention_grads(q32, k32, v32, SDPBackend.MATH)
    problems = []
    for name in precisions_here(device):
        q, k, v = (t.to(DTYPES[name]) for t in (q32, k32, v32))
        ran = kernel_that_ran(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=Hkv != H))
        math_err = max_err(attention_grads(q, k, v, SDPBackend.MATH), ref)
        fused_err = max_err(attention_grads(q, k, v), ref)
        print(f"{name}: dispatched kernel {ran}; largest relative error vs fp32 math (out, dq, dk, dv): "
              f"{ran} {fused_err:.2e}, {name} math {math_err:.2e}", flush=True)
        for backend, label in ((SDPBackend.FLASH_ATTENTION, "flash"), (SDPBackend.EFFICIENT_ATTENTION,
                                                                       "memory-efficient"),
                               (SDPBackend.CUDNN_ATTENTION, "cudnn")):
            try:
                err = max_err(attention_grads(q, k, v, backend), ref)
                print(f"  {label} forced: {err:.2e}")
                if err > max(4 * math_err, 2e-2):
                    problems.append(f"{label} {name} attention is off by {err:.1e} (math in {name}: {math_err:.1e})")
            except RuntimeError as e:
                print(f"  {label} forced: not available for these shapes ({str(e).splitlines()[0][:90]})")
        if fused_err > max(4 * math_err, 2e-2):
            problems.append(f"dispatched {name} attention ({ran}) is off by {fused_err:.1e}")
    problems += check_model_attention(args, device)
    return problems


def check_model_attention(args, device: torch.device) -> list[str]:
    """The whole model's loss and gradients, dispatched SDPA vs the math kernel, under autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = model_config(RunSpec(preset=args.preset, seq_len=args.seq_len))
    torch.manual_seed(0)
    model = CogniMamba(cfg).to(device)
    x, y = counting_batches(cfg.vocab_size, args.batch, args.seq_len, 1, device)[0]
    problems = []
    for name in precisions_here(device):
        results = []
        for backend in (None, SDPBackend.MATH):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=DTYPES[name]), \
                    (sdpa_kernel(backend) if backend is not None else torch.enable_grad()):
                _, loss = model(x, y, return_logits=False)
            loss.backward()
            results.append([loss.detach().float().reshape(1)] + [p.grad.float() for p in model.parameters()])
        err = max_err(results[0], results[1])
        print(f"model {args.preset} {name}: loss {float(results[0][0]):.5f} (dispatched) vs {float(results[1][0]):.5f}"
              f" (math); largest relative gradient difference {err:.2e}", flush=True)
        if err > 5e-2:
            problems.append(f"model gradients with the dispatched {name} kernel differ from math by {err:.1e}")
    return problems


# --- DDP and FSDP2 over a process group of one ------------------------------------------------------

def _run(out: Path, device: torch.device, parallel: str, precision: str, steps: int = 4):
    from train_worker import RandomTokens, tiny_model_config

    from cogni_mamba.config import TrainConfig
    from cogni_mamba.train import build_trainer

    torch.manual_seed(1234)
    cfg = TrainConfig(batch_size=4, grad_accum=2, max_steps=steps, lr=3e-3, min_lr=3e-4, warmup_steps=1,
                      eval_interval=steps, save_interval=steps, precision=precision, out_dir=str(out), parallel=parallel)
    val = [next(RandomTokens(4, 16, seed=99))]
    trainer = build_trainer(CogniMamba(tiny_model_config()), RandomTokens(4, 16, seed=7), val, cfg, device=str(device),
                            progress=False, log=lambda m: None)
    seen: list[torch.dtype] = []
    trainer.raw_model.layers[0].attention.wq.register_forward_pre_hook(lambda m, a: seen.append(m.weight.dtype))
    trainer.train()
    losses = [r["loss"] for r in trainer.metrics.read() if "loss" in r]
    return trainer, losses, set(seen)


def check_dist(args, device: torch.device) -> list[str]:
    import torch.distributed as dist

    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain = {p: _run(root / f"plain-{p}", device, "ddp", p)[1] for p in ("fp32", "bf16")}
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{root / 'store'}",
                                rank=0, world_size=1)
        try:
            for parallel, precision in (("ddp", "fp32"), ("fsdp", "fp32"), ("fsdp", "bf16")):
                trainer, losses, dtypes = _run(root / f"{parallel}-{precision}", device, parallel, precision)
                rel = max(abs(a - b) / b for a, b in zip(losses, plain[precision], strict=True))
                wrapper = type(trainer.model).__name__
                print(f"{parallel} {precision} ({wrapper}, forward weights {sorted(map(str, dtypes))}): losses "
                      f"{' '.join(f'{x:.4f}' for x in losses)}; plain {' '.join(f'{x:.4f}' for x in plain[precision])};"
                      f" largest relative difference {rel:.1e}", flush=True)
                tol = 1e-3 if precision == "fp32" else 3e-2
                if rel > tol:
                    problems.append(f"{parallel} {precision} losses differ from plain training by {rel:.1e}")
                if parallel == "fsdp" and precision == "bf16" and dtypes != {torch.bfloat16}:
                    problems.append(f"FSDP2 bf16 computed with {dtypes}, not bf16 weights")
                if parallel == "ddp" and wrapper != "DistributedDataParallel":
                    problems.append(f"the DDP run was wrapped in {wrapper}")
        finally:
            dist.destroy_process_group()
    return problems


# --- decode steps replayed as CUDA graphs ------------------------------------------------------------

def _engine_run(model, prompts: list[list[int]], new_tokens: int,
                device: torch.device) -> tuple[list[list[int]], float]:
    """Greedy rows through a fresh engine, twice (the first records the graphs); the second's tokens and seconds."""
    from cogni_mamba.inference import Engine
    from cogni_mamba.inference.request import greedy_settings

    engine = Engine(model, max_batch=len(prompts), prefix_rows=0)  # no kept prefixes: both runs prefill everything
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            requests = [engine.submit(p, greedy_settings(new_tokens)) for p in prompts]
            rows = [list(r) for r in requests]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return rows, seconds


def _agreement(rows: list[list[int]], reference: list[list[int]]) -> float:
    """The share of tokens before each row's first difference, over all rows."""
    same = 0
    for a, b in zip(rows, reference, strict=True):
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same += n
    return same / max(1, sum(len(b) for b in reference))


def check_graphs(args, device: torch.device) -> list[str]:
    """The engine's decode steps replayed as CUDA graphs (`--compile` on a GPU) against the same step called
    directly (its tokens must agree) and the eager lean step (tokens/s side by side; agreement printed), bf16,
    random weights (init std 0.3, so that rows do not repeat one token), 16-token prompts, batch 1 / 8 / 32."""
    import dataclasses

    from cogni_mamba.config import preset
    from cogni_mamba.inference.cuda_graphs import CallAgain, CudaGraph, GraphedDecoder
    from cogni_mamba.inference.precision import prepare_model

    cuda = device.type == "cuda"
    sizes = [("nano", (1, 8, 32)), ("tiny", (1, 8, 32))] if cuda else [("nano", (1, 4))]
    problems = []
    print("| model | batch | eager tok/s | graphs tok/s | x eager | graphs = uncaptured step | graphs = eager |")
    print("|---|---|---|---|---|---|---|")
    for name, batches in sizes:
        config = dataclasses.replace(preset(name).model, init_std=0.3)
        torch.manual_seed(0)
        model = prepare_model(CogniMamba(config).to(device), torch.bfloat16)
        eager = model.fast_decode
        graphs = GraphedDecoder(eager, recorder=CudaGraph if cuda else CallAgain)
        uncaptured = GraphedDecoder(eager, recorder=CallAgain)
        g = torch.Generator().manual_seed(1)
        for batch in batches:
            prompts = [torch.randint(0, config.vocab_size, (16,), generator=g).tolist() for _ in range(batch)]
            out = {}
            for label, decoder in (("eager", eager), ("graphs", graphs), ("uncaptured", uncaptured)):
                model.fast_decode = decoder
                out[label] = _engine_run(model, prompts, args.steps, device)
            model.fast_decode = eager
            if graphs.failed:
                problems.append(f"{name}: {graphs.failed}")
                break
            speed = {k: batch * args.steps / seconds for k, (_, seconds) in out.items()}
            same = _agreement(out["graphs"][0], out["uncaptured"][0])
            print(f"| {name} | {batch} | {speed['eager']:,.0f} | {speed['graphs']:,.0f} | "
                  f"{speed['graphs'] / speed['eager']:.2f}x | {same:.3f} | "
                  f"{_agreement(out['graphs'][0], out['eager'][0]):.3f} |", flush=True)
            if same < 0.95:
                problems.append(f"{name} batch {batch}: graphs and the uncaptured step agree on {same:.1%} of tokens")
        print(f"{name}: {graphs.recorded} graphs recorded" + (f" ({graphs.failed})" if graphs.failed else ""))
        problems += _sampled_batch(model, graphs, config.vocab_size, args.steps)
    return problems


def _sampled_batch(model, decoder, vocab: int, new_tokens: int) -> list[str]:
    """Sampled rows through the graphs, one seeded and three not, with the same settings (one group in `pick_tokens`,
    whose uniform numbers come from two generators): every row must run to its token budget."""
    from cogni_mamba.config import GenerationConfig
    from cogni_mamba.inference import Engine

    model.fast_decode = decoder
    engine = Engine(model, max_batch=4, prefix_rows=0)
    g = torch.Generator().manual_seed(2)
    try:
        with torch.inference_mode():
            requests = [engine.submit(torch.randint(0, vocab, (12,), generator=g).tolist(),
                                      GenerationConfig(max_new_tokens=new_tokens, seed=7 if i == 0 else None))
                        for i in range(4)]
            lengths = [len(list(r)) for r in requests]
    except Exception as e:  # noqa: BLE001 - reported as the check's failure
        return [f"sampled rows (one seeded) failed: {type(e).__name__}: {e}"]
    finally:
        model.fast_decode = decoder.eager
    print(f"sampled rows, one seeded: {lengths} tokens")
    return [] if lengths == [new_tokens] * 4 else [f"sampled rows made {lengths} tokens, not {new_tokens} each"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=["precision", "attention", "dist", "graphs"])
    p.add_argument("--preset", default="medium")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=8, help="training steps; for graphs: new tokens per row")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    if device.type != "cuda":
        print("(no CUDA: fp16 and the CUDA kernels are not checked here)")
    checks = {"precision": check_precision, "attention": check_attention, "dist": check_dist, "graphs": check_graphs}
    problems = checks[args.check](args, device)
    print("PASS" if not problems else "FAIL: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
