"""`cogni-mamba train`: pretrain a model on prepared token shards (single process or under torchrun)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import OPTIMIZERS, PARALLELS, PRECISIONS, SCHEDULES, TRACKERS
from .common import add_config_args, config_from_args

EPILOG = """Each step is train.batch_size x train.grad_accum sequences of data.seq_len tokens on every
process (effective batch = micro batch x accumulation x world size). The run folder (--out) gets
step-N/, epoch-N/, best/ checkpoints, a `latest` pointer, metrics.jsonl and loss.png. Ctrl-C or
SIGTERM saves a checkpoint at the current step and exits 0; --resume continues from `latest` with
the same data order, so the losses match an uninterrupted run.

examples:
  cogni-mamba train --preset nano --data data/tinystories --tokenizer tok/ --out runs/nano
  cogni-mamba train --preset nano --data data/tinystories data/code --set data.weights=3,1 --max-steps 2000
  cogni-mamba train --out runs/nano --data data/tinystories --resume
  cogni-mamba train --preset nano --data data/tinystories --optimizer muon --schedule wsd --log tensorboard
  torchrun --nproc_per_node 4 -m cogni_mamba train --preset small --data data/tinystories --tokenizer gpt2
  torchrun --nproc_per_node 8 -m cogni_mamba train --preset large --parallel fsdp --data data/tinystories
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a model from scratch on prepared data",
                       description="Pretrain a CogniMamba model on token shards made by `cogni-mamba prepare`.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--data", nargs="+", metavar="DIR", help="prepared dataset folder(s) (default: data.data_dirs)")
    p.add_argument("--tokenizer", metavar="DIR|NAME",
                   help="the tokenizer the data was prepared with (default: the config's, else gpt2)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: train.out_dir)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: train.epochs epochs)")
    p.add_argument("--precision", choices=PRECISIONS, help="auto (default), bf16, fp16 (CUDA) or fp32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--minutes", type=float, metavar="M",
                   help="a wall-clock budget (train.max_minutes): the run lasts M minutes, its schedule fitted to "
                        "the pace as it goes (--max-steps still caps it; the epoch count does not)")
    p.add_argument("--auto-size", action="store_true",
                   help="with --minutes: measure model sizes on this machine and train the best one for the budget "
                        "(see `cogni-mamba plan`)")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adamw, or muon (Muon on the hidden matrices, AdamW on embeddings and norms)")
    p.add_argument("--schedule", choices=SCHEDULES, help="cosine, or wsd (warmup, constant, then a final decay)")
    p.add_argument("--log", nargs="+", choices=TRACKERS, metavar="TRACKER",
                   help=f"also log to: {', '.join(TRACKERS)} (optional packages; metrics.jsonl is always written)")
    p.add_argument("--parallel", choices=PARALLELS,
                   help="under torchrun: ddp (default; a whole model per GPU) or fsdp (sharded, for models too "
                        "big for one GPU)")
    p.add_argument("--force", action="store_true",
                   help="start even when the pre-flight check finds too little free disk or memory (warns instead)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this rank's GPU when there is one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _config(args: argparse.Namespace):
    """Preset/config file/--set, then the run's saved config when resuming, then the flags."""
    from ..config import apply_overrides, replace
    from ..train import checkpoint as ckpt

    cfg = config_from_args(args)
    out = Path(args.out or cfg.train.out_dir)
    if args.resume:
        cfg = apply_overrides(ckpt.load_config_of(ckpt.find_checkpoint(out)), args.overrides)
    train = replace(cfg.train, out_dir=str(out))
    if args.max_steps is not None:
        train = replace(train, max_steps=args.max_steps)
    if args.precision:
        train = replace(train, precision=args.precision)
    if args.compile:
        train = replace(train, compile=True)
    if args.parallel:
        train = replace(train, parallel=args.parallel)
    if args.minutes is not None:
        train = replace(train, max_minutes=args.minutes)
    for flag, field in (("optimizer", "optimizer"), ("schedule", "schedule"), ("log", "log_to")):
        if getattr(args, flag):
            train = replace(train, **{field: getattr(args, flag)})
    data = replace(cfg.data, data_dirs=list(args.data)) if args.data else cfg.data
    tokenizer = args.tokenizer or cfg.tokenizer or "gpt2"
    return replace(cfg, train=train, data=data, tokenizer=tokenizer)


def _tokenizer_for(cfg, out: Path, resume: bool):
    """The run's tokenizer (the checkpoint's own when resuming), checked against the data's fingerprint."""
    from ..data import read_meta
    from ..errors import CogniError
    from ..tokenizer import load_tokenizer
    from ..train import checkpoint as ckpt

    metas = {d: read_meta(d) for d in cfg.data.data_dirs}  # a wrong --data path is reported first
    saved = ckpt.find_checkpoint(out) / "tokenizer" if resume else None
    tokenizer = load_tokenizer(saved if saved is not None and saved.is_dir() else cfg.tokenizer)
    for d, meta in metas.items():
        if meta.get("tokenizer_fingerprint") != tokenizer.fingerprint:
            raise CogniError(f"{d} was prepared with a different tokenizer than {cfg.tokenizer}; pass the "
                             "--tokenizer it was prepared with, or prepare the data again.")
    return tokenizer


def _auto_size(cfg, device):
    """The config with the model `cogni-mamba plan` picks for the run's time budget."""
    import os

    from ..errors import CogniError
    from ..plan import apply_plan, plan_for_budget

    if cfg.train.max_minutes is None:
        raise CogniError("--auto-size sizes the model for a time budget; pass --minutes M too.")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CogniError("--auto-size measures one process; run `cogni-mamba plan` once and pass its shape with "
                         "--set model.dim=... under torchrun.")
    plan = plan_for_budget(cfg.train.max_minutes, cfg, device, say=lambda s: print(s, flush=True))
    print(plan.describe(), flush=True)
    return apply_plan(cfg, plan)


def run(args: argparse.Namespace) -> int:
    import os

    from ..config import replace
    from ..errors import CogniError
    from ..train import build_trainer
    from ..train.build import pretraining_inputs
    from ..train.distributed import exit_worker, init_distributed, pick_device, shutdown

    cfg = _config(args)
    if not cfg.data.data_dirs:
        raise CogniError("No training data given; pass --data DIR (a folder made by `cogni-mamba prepare`).")
    out = Path(cfg.train.out_dir)
    tokenizer = _tokenizer_for(cfg, out, args.resume)
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=tokenizer.vocab_size))
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise CogniError(f"data.seq_len ({cfg.data.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len}); "
                         "lower data.seq_len or raise model.max_seq_len.")
    device = pick_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    if args.auto_size and not args.resume:
        cfg = _auto_size(cfg, device)
    info = init_distributed(device)
    try:
        model, batches, val = pretraining_inputs(cfg, info)
        trainer = build_trainer(model, batches, val, cfg.train, config=cfg, tokenizer=tokenizer, out_dir=out,
                                device=device, dist=info, progress=not args.quiet, force=args.force)
        if info.is_main:
            n, B, T = model.num_parameters(), cfg.train.batch_size, cfg.data.seq_len
            length = (f"{cfg.train.max_minutes:g} minutes (the schedule fitted to the pace as it goes)"
                      if trainer.step_limit is None else f"{trainer.total_steps} steps")
            print(f"training {n / 1e6:.2f}M parameters on {device} x {info.world_size} in {trainer.precision}: "
                  f"{length} of {B * cfg.train.grad_accum * info.world_size} x {T} tokens -> {out}")
        if args.resume:
            trainer.resume(out)
        result = trainer.train()
        if info.is_main:
            print(result.summary())
            print(f"chat with it: cogni-mamba chat --checkpoint {out}")
    finally:
        shutdown(info)
    exit_worker(info)  # under torchrun: see its docstring
    return 0
