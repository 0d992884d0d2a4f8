"""Training throughput: our training step against transformers' LlamaForCausalLM on the same weights.

Both models get the identical config and weights (a plain key map), the same synthetic batch, the
same precision and the same optimizer step: the Trainer's own (`Trainer.train_step` from
`build_trainer`: AdamW foreach/fused, autocast, gradient clipping), transformers' model behind
`common.LlamaLoss`, which answers the Trainer's call. transformers uses its SDPA attention. Before timing, the two losses are checked
to agree, so the same maths is timed. Steps alternate between the two models (A B B A ...), and the
medians give tokens/s and the ratio. On a machine shared with other jobs, `--threads 1 --clock cpu`
times the process's CPU time, which counts the work done rather than time spent descheduled.

    .venv/bin/python benchmarks/train_throughput.py                  # nano and tiny, fp32 and bf16
    .venv/bin/python benchmarks/train_throughput.py --quick          # CI size: nano, few steps
    .venv/bin/python benchmarks/train_throughput.py --threads 1 --clock cpu --compile ours
    .venv/bin/python benchmarks/train_throughput.py --presets medium --precisions bf16 fp16 --compile both

`--ours-only` measures our step alone (a fresh process per configuration on a CPU): tokens/s, MFU
against the GPU's dense bf16 peak (FLOPs per token from `cogni_mamba.stats.flops_per_token`), peak
memory (on CUDA `max_memory_allocated` and `max_memory_reserved`), the fp16 loss scale and skipped
steps, and the first step's time (which includes compilation):

    python3 benchmarks/train_throughput.py --ours-only --presets medium --precisions bf16 fp16 --compile ours
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    LlamaLoss,
    RunSpec,
    add_machine_args,
    alternate,
    bench_trainer,
    hf_loss,
    machine,
    markdown_table,
    measure,
    median,
    mib,
    model_config,
    run_isolated,
    synthetic_batch,
)

from cogni_mamba.export import to_transformers
from cogni_mamba.model import CogniMamba
from cogni_mamba.stats import flops_per_token

# Which (shape) each preset runs at: the nano preset's own batch; a smaller batch for tiny on a CPU.
DEFAULT_SHAPES = {"nano": (16, 256), "tiny": (4, 256), "small": (4, 512), "medium": (4, 512), "large": (4, 512)}


def check_same_loss(ours: CogniMamba, hf, batch) -> None:
    """The two models must compute the same loss on the batch (fp32), or the timing compares different maths."""
    x, y = batch
    with torch.no_grad():
        a, b = ours(x, y)[1], hf_loss(hf, x, y)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"losses differ: ours {float(a):.6f}, transformers {float(b):.6f}; not timing different maths")


def compare(preset_name: str, precision: str, batch: int, seq_len: int, steps: int, device: torch.device,
            compile: str, clock: str) -> dict:
    """Median tokens/s of both training steps, alternated, plus first-step (compile) times."""
    torch.manual_seed(0)
    ours = CogniMamba(model_config(RunSpec(preset=preset_name, seq_len=seq_len))).to(device).train()
    hf = to_transformers(ours).train()
    hf.config.use_cache = False  # no KV cache while training
    data = synthetic_batch(ours.config.vocab_size, batch, seq_len, seed=1, device=device)
    check_same_loss(ours, hf, data)
    steps_ours = bench_trainer(ours, [data], precision, device, compile=compile in ("ours", "both"))
    steps_hf = bench_trainer(LlamaLoss(hf), [data], precision, device, compile=compile == "both",
                             model_config=ours.config)
    first = {}
    for name, trainer in (("ours", steps_ours), ("hf", steps_hf)):
        t0 = time.perf_counter()
        trainer.train_step()  # warm-up (and compilation)
        first[name] = time.perf_counter() - t0
        trainer.train_step()
    times = alternate({"ours": steps_ours.train_step, "hf": steps_hf.train_step}, steps, device, clock)
    tokens = batch * seq_len
    return {"ours": tokens / median(times["ours"]), "hf": tokens / median(times["hf"]),
            "first_ours": first["ours"], "first_hf": first["hf"]}


def ours_only(args, device: torch.device) -> list[list[str]]:
    """Rows of tokens/s, MFU, peak memory and first-step time for our step alone."""
    from cogni_mamba.train.metrics import device_peak_flops

    peak_flops = device_peak_flops(device)
    rows = []
    for name in args.presets:
        batch, seq = DEFAULT_SHAPES.get(name, (4, 256))
        batch, seq = args.batch or batch, args.seq_len or seq
        for precision in args.precisions:
            spec = RunSpec(preset=name, precision=precision, batch=batch, seq_len=seq, steps=args.steps, warmup=2,
                           compile=args.compile != "none", device=args.device, threads=args.threads, clock=args.clock)
            r = measure(spec) if device.type == "cuda" else run_isolated(spec)
            achieved = flops_per_token(model_config(spec), seq)[1] * r["tokens_per_s"]
            mfu = f"{100 * achieved / peak_flops:.1f}%" if peak_flops else f"- ({achieved / 1e9:.0f} GFLOP/s)"
            reserved = mib(r["reserved_bytes"]) if "reserved_bytes" in r else "-"
            scale = f"{r['loss_scale']:g} / {r['skipped_steps']}" if r.get("loss_scale") is not None else "-"
            rows.append([name, precision, "yes" if spec.compile else "no", f"{batch} x {seq}",
                         f"{r['tokens_per_s']:,.0f}", mfu, mib(r["peak_bytes"]), reserved, scale,
                         f"{r['last_loss']:.3f}", f"{r['first_step_s']:.1f}"])
            print(f"  {name} {precision} compile={spec.compile}: {r['tokens_per_s']:,.0f} tok/s", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["nano", "tiny"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch", type=int, help="batch size (default: per preset, see DEFAULT_SHAPES)")
    p.add_argument("--seq-len", type=int, help="sequence length (default: per preset)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (alternated)")
    p.add_argument("--compile", choices=["none", "ours", "both"], default="none",
                   help="torch.compile our model only, or both (the first-step column shows compile time)")
    add_machine_args(p)
    p.add_argument("--ours-only", action="store_true", help="our step alone: tokens/s, MFU, peak memory")
    p.add_argument("--quick", action="store_true", help="CI size: nano only, batch 4 x 64, 3 steps")
    args = p.parse_args()
    if args.quick:
        args.presets, args.batch, args.seq_len, args.steps = ["nano"], 4, 64, 3
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {machine()}")
    print(f"step: the Trainer's (AdamW {'fused' if device.type == 'cuda' else 'foreach'}, clip 1.0), synthetic tokens; "
          f"compile: {args.compile}; {args.clock} clock; median of {args.steps} alternated steps\n")
    if args.ours_only:
        rows = ours_only(args, device)
        print()
        print(markdown_table(["preset", "precision", "compiled", "batch x seq", "tok/s", "MFU (dense bf16 peak)",
                              "peak memory", "peak reserved", "fp16 loss scale / skipped", "loss",
                              "first step s"], rows))
        return
    rows = []
    for name in args.presets:
        batch, seq = DEFAULT_SHAPES.get(name, (4, 256))
        batch, seq = args.batch or batch, args.seq_len or seq
        for precision in args.precisions:
            r = compare(name, precision, batch, seq, args.steps, device, args.compile, args.clock)
            rows.append([name, precision, f"{batch} x {seq}", f"{r['ours']:,.0f}", f"{r['hf']:,.0f}",
                         f"{r['ours'] / r['hf']:.2f}x", f"{r['first_ours']:.1f} / {r['first_hf']:.1f}"])
            print(f"  {name} {precision}: ours {r['ours']:,.0f} tok/s, transformers {r['hf']:,.0f} tok/s", flush=True)
    print()
    print(markdown_table(["preset", "precision", "batch x seq", "ours tok/s", "transformers tok/s", "ratio",
                          "first step s (ours / hf)"], rows))


if __name__ == "__main__":
    main()
