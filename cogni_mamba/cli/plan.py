"""`cogni-mamba plan`: which model size trains best in a time budget on this machine."""

from __future__ import annotations

import argparse

EPILOG = """Each candidate size is trained for a few seconds with the real training step on this device
(batch, sequence length and precision from the preset / --set), which predicts the tokens it can see
in the budget; the plan takes the one with the lowest loss by the Chinchilla paper's fit
L(N, D) = E + A/N^0.34 + B/D^0.28 over its parameters N and those tokens D (at scale this is ~20
tokens per parameter; on a CPU it favours larger models, which slow down less than they grow). `cogni-mamba train --minutes M --auto-size` trains it.

examples:
  cogni-mamba plan --minutes 5
  cogni-mamba plan --minutes 120 --device cuda --preset small --data data/tinystories
"""


def add_parser(sub) -> argparse.ArgumentParser:
    from .common import add_command, add_config_args

    p = add_command(sub, "plan", "pick the model size for a time budget on this machine",
                    "Measure a few model sizes on this machine and plan the best one for a budget.", EPILOG)
    add_config_args(p)
    p.add_argument("--minutes", type=float, required=True, help="the training budget")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: a GPU when there is one)")
    p.add_argument("--data", nargs="+", metavar="DIR", help="prepared data: its vocabulary size is used")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per candidate (default 3)")
    return p


def base_config(args: argparse.Namespace):
    """The preset (default nano) with the data's vocabulary size."""
    from ..config import replace
    from .common import config_from_args

    if not args.preset and not args.config:
        args.preset = "nano"
    cfg = config_from_args(args)
    if args.data:
        from ..data import read_meta

        vocab = read_meta(args.data[0])["vocab_size"]
        cfg = replace(cfg, model=replace(cfg.model, vocab_size=vocab), data=replace(cfg.data, data_dirs=list(args.data)))
    return cfg


def run(args: argparse.Namespace) -> int:
    from ..plan import plan_for_budget
    from ..train.distributed import pick_device

    cfg = base_config(args)
    plan = plan_for_budget(args.minutes, cfg, pick_device(args.device), seconds_each=args.seconds,
                           say=lambda s: print(s, flush=True))
    print(plan.describe())
    return 0
