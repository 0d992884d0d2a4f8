"""`cogni-mamba info`: parameters, FLOPs and memory of a config, before any weights exist."""

from __future__ import annotations

import argparse

from .. import stats
from .common import add_config_args, config_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="parameter counts, FLOPs per token and memory estimates of a config")
    add_config_args(p)
    p.add_argument("--batch", type=int, default=4, help="micro batch for the training memory estimate (default 4)")
    p.add_argument("--seq", type=int, default=512, help="sequence length for the estimates (default 512)")
    p.add_argument("--save-config", metavar="FILE",
                   help="also write the whole resolved config to FILE as JSON (the repo's config.json is "
                        "`info --preset medium --save-config config.json`)")
    return p


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.save_config:
        from ..config import save_config

        save_config(cfg, args.save_config)
    m = cfg.model
    p = stats.param_counts(m)
    fwd, train = stats.flops_per_token(m, args.seq)
    b = stats.human_bytes
    print(f"preset: {cfg.preset or 'custom'}  dim={m.dim} layers={m.n_layers} heads={m.n_heads} "
          f"kv_heads={m.n_kv_heads} head_dim={m.head_dim} ffn={m.ffn_dim} vocab={m.vocab_size} "
          f"context={m.max_seq_len} tied={m.tie_embeddings}")
    print("\nparameters")
    print(f"  total           {p.total:>15,}")
    print(f"  embedding       {p.embedding:>15,}" + ("  (shared with the LM head)" if m.tie_embeddings else ""))
    if p.head:
        print(f"  lm head         {p.head:>15,}")
    print(f"  non-embedding   {p.non_embedding:>15,}")
    print(f"  per block       {p.per_block:>15,}  (attention {p.attention:,}, feed-forward {p.feed_forward:,}, "
          f"norms {p.norms:,})")
    print(f"\nFLOPs per token at context {args.seq}: forward {fwd / 1e6:,.1f} M, training {train / 1e6:,.1f} M")

    print(f"\ntraining memory at batch {args.batch} x {args.seq} (AdamW, fp32 master weights)")
    print(f"  {'':14}{'fp32':>12}{'mixed (bf16/fp16)':>20}")
    full = stats.train_memory(m, args.batch, args.seq, mixed=False)
    mixed = stats.train_memory(m, args.batch, args.seq, mixed=True)
    for name in ("weights", "gradients", "optimizer", "weight_casts", "activations", "total"):
        print(f"  {name.replace('_', ' '):14}{b(getattr(full, name)):>12}{b(getattr(mixed, name)):>20}")

    print(f"\ninference memory (batch 1, KV cache at the full context of {m.max_seq_len})")
    print(f"  {'':14}{'fp32':>12}{'bf16/fp16':>12}")
    w32, kv32 = stats.inference_memory(m, 4)
    w16, kv16 = stats.inference_memory(m, 2)
    print(f"  {'weights':14}{b(w32):>12}{b(w16):>12}")
    print(f"  {'KV cache':14}{b(kv32):>12}{b(kv16):>12}")
    print(f"  {'total':14}{b(w32 + kv32):>12}{b(w16 + kv16):>12}")
    return 0
