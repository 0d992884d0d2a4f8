"""Quality vs resource, measured: per preset, true parameters, estimated and measured peak training
memory, training tokens/s, and the seed's training run extrapolated from that throughput.

Estimated memory comes from `cogni_mamba.stats.train_memory` (weights, gradients, AdamW moments and
activations, from the config alone); measured memory is CUDA max allocated on a GPU and the peak
RSS of a fresh process (minus its RSS before the model) on a CPU. The seed's run is taken as
3 epochs of TinyStories, assumed to be about 470M GPT-2 tokens per epoch (2.1M stories of ~220
tokens), i.e. 1.41B tokens; the extrapolated time is that divided by the measured tokens/s.

    .venv/bin/python benchmarks/presets.py --quick       # CI size: nano and tiny only, tiny shapes
    .venv/bin/python benchmarks/presets.py               # CPU: every preset, smaller shapes for big ones
    python3 benchmarks/presets.py --batch 4 --seq-len 512   # GPU: every preset at the seed's 4 x 512
"""

from __future__ import annotations

import argparse
import math

import torch
from common import (
    RunSpec,
    add_machine_args,
    machine,
    markdown_table,
    measure_all,
    mib,
    model_config,
    summarise,
)

from cogni_mamba.config import PRESETS
from cogni_mamba.model import CogniMamba
from cogni_mamba.stats import train_memory

EPOCH_TOKENS = 470_000_000  # assumed TinyStories size in GPT-2 tokens (see the module docstring)
EPOCHS = 3

# The seed's table: parameters, training memory, training time (its hardware unstated).
SEED = {"tiny": ("~80M", "3-4 GB", "20 min"), "small": ("~120M", "4-5 GB", "30 min"),
        "medium": ("~168M", "6-8 GB", "45 min"), "large": ("~300M", "10-12 GB", "75 min")}

# Shapes a 2-core CPU gets through in minutes: the seed's 4 x 512 for the small presets only.
CPU_SHAPES = {"nano": (4, 512), "tiny": (4, 512), "small": (1, 128), "medium": (1, 128), "large": (1, 128)}
QUICK_SHAPES = {"nano": (2, 64), "tiny": (1, 64)}


def true_params(name: str) -> int:
    """Parameters of the built module (on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        return CogniMamba(model_config(RunSpec(preset=name))).num_parameters()


def hours(tokens_per_s: float) -> str:
    if not tokens_per_s or not math.isfinite(tokens_per_s):
        return "nan"
    h = EPOCHS * EPOCH_TOKENS / tokens_per_s / 3600
    return f"{h * 60:.0f} min" if h < 1 else (f"{h:.1f} h" if h < 48 else f"{h / 24:.0f} days")


def preset_table(specs: dict[str, RunSpec], results: dict[str, dict], mixed: bool) -> str:
    rows = []
    for name, spec in specs.items():
        cfg, r = model_config(spec), results[name]
        est_seed = train_memory(model_config(RunSpec(preset=name, seq_len=512)), 4, 512, mixed=mixed).total
        est_here = train_memory(cfg, spec.batch, spec.seq_len, mixed=mixed).total
        seed = SEED.get(name, ("-", "-", "-"))
        rows.append([name, f"{true_params(name) / 1e6:.1f}M", seed[0], mib(est_seed), seed[1],
                     f"{spec.batch} x {spec.seq_len}", mib(est_here), mib(r["peak_bytes"]),
                     f"{r['tokens_per_s']:,.0f}", hours(r["tokens_per_s"]), seed[2]])
    return markdown_table(["preset", "params", "seed: params", "est. mem 4x512", "seed: mem", "measured at",
                           "est. mem there", "measured peak", "train tok/s", "3 epochs x 470M tok", "seed: time"],
                          rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default: bf16")
    p.add_argument("--batch", type=int, help="one batch size for every preset (default: 4 on GPU, per preset on CPU)")
    p.add_argument("--seq-len", type=int, help="one sequence length for every preset (default 512 on GPU)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (median)")
    p.add_argument("--repeats", type=int, default=1, help="runs per preset, in turns")
    add_machine_args(p)
    p.add_argument("--quick", action="store_true", help="CI size: nano and tiny at tiny shapes")
    args = p.parse_args(argv)
    args.precision = args.precision or "bf16"
    return args


def shapes(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(batch, seq_len) per preset: --batch/--seq-len if given, else 4 x 512 on GPU and CPU_SHAPES on CPU."""
    if args.quick:
        table = {n: s for n, s in QUICK_SHAPES.items() if n in args.presets}
    elif args.device.startswith("cuda"):
        table = {n: (4, 512) for n in args.presets}
    else:
        table = {n: CPU_SHAPES[n] for n in args.presets}
    return {n: (args.batch or b, args.seq_len or t) for n, (b, t) in table.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    isolate = not args.device.startswith("cuda")
    specs = {name: RunSpec(preset=name, precision=args.precision, batch=b, seq_len=t, steps=args.steps, warmup=1,
                           device=args.device, threads=args.threads, clock=args.clock)
             for name, (b, t) in shapes(args).items()}
    print(f"machine: {machine()}")
    print(f"precision {args.precision}; {args.steps} timed steps per run, {args.repeats} run(s) per preset; "
          f"{args.clock} clock; measured peak = "
          f"{'peak RSS of a fresh process minus its RSS before the model' if isolate else 'CUDA max allocated'}; "
          f"estimates from cogni_mamba.stats.train_memory (mixed={args.precision != 'fp32'})", flush=True)
    runs = measure_all(specs, args.repeats, isolate)
    print("\n" + preset_table(specs, {n: summarise(r) for n, r in runs.items()}, args.precision != "fp32"))


if __name__ == "__main__":
    main()
