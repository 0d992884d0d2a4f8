"""What each training technique buys: toggle one at a time against the full configuration.

The full configuration trains with mixed precision (bf16 autocast on a CPU, fp16 + GradScaler on a
GPU unless --precision says otherwise), SDPA attention, grouped-query attention and tied
embeddings. Each row turns one technique off and measures training tokens/s and peak memory
(peak RSS of a fresh process on a CPU, CUDA max allocated on a GPU); gradient accumulation compares
8 micro-batches of b with one batch of 8b. A decode table compares GQA with MHA: KV-cache size and
decode tokens/s. Configurations run in turns, each repeated; the table shows medians beside the
seed's claimed figures.

    .venv/bin/python benchmarks/ablations.py --quick                   # CI size (nano, tiny shapes)
    .venv/bin/python benchmarks/ablations.py                           # nano preset, batch 8 x 256
    .venv/bin/python benchmarks/ablations.py --threads 1 --clock cpu   # on a machine busy with other jobs
    python3 benchmarks/ablations.py --preset medium --batch 4 --seq-len 512   # on a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from common import RunSpec, add_machine_args, machine, markdown_table, measure_all, mib, summarise

# The seed's claims: (speedup, memory saving), as its documents state them.
CLAIMS = {
    "precision": ("1.5x", "50%"),
    "attention": ("2.0x", "30%"),
    "gqa": ("1.3x", "25%"),
    "accumulation": ("1.0x", "simulates 8x batch"),
    "tying": ("1.0x", "20%"),
    "combined": ("~3.5x", "~65%"),
}


def plan(base: RunSpec, accum: int) -> tuple[dict[str, RunSpec], list[tuple[str, str, str, str]]]:
    """The configurations to run, and the table rows as (key, label, with-config, without-config)."""
    mha = {"n_kv_heads": _n_heads(base)}
    specs = {
        "full": base,
        "fp32": dataclasses.replace(base, precision="fp32"),
        "naive": dataclasses.replace(base, attention="naive"),
        "mha": dataclasses.replace(base, changes={**base.changes, **mha}),
        "untied": dataclasses.replace(base, changes={**base.changes, "tie_embeddings": False}),
        "accum": dataclasses.replace(base, accum=accum),
        "big": dataclasses.replace(base, batch=base.batch * accum),
        "none": dataclasses.replace(base, precision="fp32", attention="naive",
                                    changes={**base.changes, **mha, "tie_embeddings": False}),
    }
    mixed = base.precision
    rows = [
        ("precision", f"mixed precision ({mixed} autocast vs fp32)", "full", "fp32"),
        ("attention", "SDPA (fused) vs plain matmul-softmax attention", "full", "naive"),
        ("gqa", "grouped-query attention vs MHA, equal dim", "full", "mha"),
        ("accumulation", f"grad accumulation {accum} x b vs one batch of {accum}b", "accum", "big"),
        ("tying", "tied vs untied embeddings", "full", "untied"),
        ("combined", "all four on vs all off", "full", "none"),
    ]
    return specs, rows


def decode_plan(base: RunSpec, new_tokens: int) -> dict[str, RunSpec]:
    """Decode runs for GQA and MHA: prompt of seq_len tokens, then `new_tokens` greedy steps."""
    dec = dataclasses.replace(base, mode="decode", new_tokens=new_tokens, accum=1)
    return {"decode GQA": dec,
            "decode MHA": dataclasses.replace(dec, changes={**dec.changes, "n_kv_heads": _n_heads(base)})}


def _n_heads(spec: RunSpec) -> int:
    from common import model_config

    return model_config(spec).n_heads


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def ablation_table(results: dict[str, dict], rows) -> str:
    """Markdown: one row per technique, measured speedup and memory saving beside the seed's claim."""
    out = []
    for key, label, on, off in rows:
        a, b = results[on], results[off]
        speed = ratio(a["tokens_per_s"], b["tokens_per_s"])
        saving = 1 - ratio(a["peak_bytes"], b["peak_bytes"])
        claim_speed, claim_mem = CLAIMS[key]
        out.append([label, f"{a['tokens_per_s']:,.0f}", f"{b['tokens_per_s']:,.0f}", f"{speed:.2f}x",
                    mib(a["peak_bytes"]), mib(b["peak_bytes"]), f"{100 * saving:.0f}%", claim_speed, claim_mem])
    return markdown_table(["technique (on vs off)", "tok/s on", "tok/s off", "speedup", "peak mem on",
                           "peak mem off", "memory saving", "seed: speedup", "seed: saving"], out)


def decode_table(results: dict[str, dict], spec: RunSpec) -> str:
    out = []
    for name, r in results.items():
        out.append([name.split()[1], f"{spec.batch} x {spec.seq_len + spec.new_tokens}", mib(r["kv_cache_bytes"]),
                    f"{r['tokens_per_s']:,.0f}"])
    ref = results["decode GQA"]["kv_cache_bytes"] / results["decode MHA"]["kv_cache_bytes"]
    return markdown_table(["attention", "cache (batch x tokens)", "KV cache", "decode tok/s"], out) + \
        f"\n\nGQA's KV cache is {ref:.2f} of MHA's (n_kv_heads / n_heads)."


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--precision", choices=["bf16", "fp16"], help="mixed precision (default: fp16 on CUDA, else bf16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--accum", type=int, default=8, help="micro-batches in the accumulation row")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (median)")
    p.add_argument("--repeats", type=int, default=3, help="runs of every configuration, in turns")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps in the KV-cache table")
    add_machine_args(p)
    p.add_argument("--quick", action="store_true", help="CI size: batch 2 x 64, accumulation 4, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.accum, args.steps, args.repeats, args.new_tokens = 2, 64, 4, 2, 1, 8
    args.precision = args.precision or ("fp16" if args.device.startswith("cuda") else "bf16")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    base = RunSpec(preset=args.preset, precision=args.precision, batch=args.batch, seq_len=args.seq_len,
                   steps=args.steps, warmup=1, device=args.device, threads=args.threads, clock=args.clock)
    isolate = not args.device.startswith("cuda")  # a CPU process's peak RSS only grows: one process per run
    specs, rows = plan(base, args.accum)
    decodes = decode_plan(base, args.new_tokens)
    print(f"machine: {machine()}")
    print(f"preset {args.preset}, batch {args.batch} x {args.seq_len}, mixed precision {args.precision}, "
          f"{args.steps} timed steps per run, {args.repeats} runs per configuration in turns, {args.clock} clock; "
          f"peak memory = {'peak RSS of a fresh process minus its RSS before the model' if isolate else 'CUDA max allocated'}",
          flush=True)
    runs = measure_all({**specs, **decodes}, args.repeats, isolate)
    results = {name: summarise(r) for name, r in runs.items()}
    print("\n" + ablation_table(results, rows))
    print("\n" + decode_table({k: results[k] for k in decodes}, decodes["decode GQA"]))


if __name__ == "__main__":
    main()
