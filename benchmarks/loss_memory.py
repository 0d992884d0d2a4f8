"""Peak memory of one training step with the loss alone against the old full-logits loss.

The old step kept the (B, T, V) logits in the compute dtype until after backward and took the
cross-entropy over their fp32 copy, whose log-probabilities autograd kept too; the trainer now calls
`model(x, y, return_logits=False)` (`cogni_mamba.model.linear_cross_entropy`), which makes logits a
chunk at a time and keeps only the gradients of the hidden states and of the head. Each
configuration runs in a fresh process; peak = its peak RSS minus its RSS before the model (CPU) or
`max_memory_allocated` (CUDA). The table shows the drop beside the size of the fp32 logits copy.

    .venv/bin/python benchmarks/loss_memory.py                      # tiny preset, 4 x 512, bf16, CPU
    .venv/bin/python benchmarks/loss_memory.py --precision fp32 --threads 1
"""

from __future__ import annotations

import argparse

import torch
from common import RunSpec, machine, markdown_table, measure, mib, model_config, run_isolated


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    specs = {loss: RunSpec(preset=args.preset, precision=args.precision, batch=args.batch, seq_len=args.seq_len,
                           steps=args.steps, warmup=1, device=args.device, threads=args.threads, loss=loss)
             for loss in ("logits", "fused")}
    print(f"machine: {machine()}")
    print(f"{args.preset}, batch {args.batch} x {args.seq_len}, {args.precision}; peak = "
          f"{'CUDA max allocated' if args.device.startswith('cuda') else 'peak RSS of a fresh process minus its RSS before the model'}",
          flush=True)
    cuda = args.device.startswith("cuda")
    results = {name: (measure(spec) if cuda else run_isolated(spec)) for name, spec in specs.items()}
    V = model_config(specs["fused"]).vocab_size
    fp32_copy = args.batch * args.seq_len * V * 4
    rows = [[label, mib(results[k]["peak_bytes"]), f"{results[k]['tokens_per_s']:,.0f}", f"{results[k]['last_loss']:.4f}"]
            for k, label in (("logits", "full logits + fp32 copy (before)"), ("fused", "loss alone (after)"))]
    print("\n" + markdown_table(["training step", "peak memory", "tok/s", "loss"], rows))
    drop = results["logits"]["peak_bytes"] - results["fused"]["peak_bytes"]
    print(f"\npeak memory drop: {mib(drop)}; the fp32 logits copy is {args.batch} x {args.seq_len} x {V:,} x 4 B = "
          f"{mib(fp32_copy)} ({drop / fp32_copy:.2f}x of it)")


if __name__ == "__main__":
    main()
