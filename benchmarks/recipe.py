"""Training recipes side by side: held-out bits per byte after the same budget, and the tokens each
recipe needs to reach the baseline's final loss.

The data is the shared TinyStories sample: a tenth of its stories (chosen by `prepare`'s seeded hash)
are held out, a byte-level BPE is trained on the rest only, and both are tokenized with it. Every
recipe trains the same preset from the same initial weights on the same batches, through the real
Trainer, for the same number of optimizer steps (so the same tokens); the recipes run as separate
processes at one thread each, two at a time, so load on a shared machine hits them alike, and each
one's seconds per step is printed beside it. At every evaluation the Trainer scores fixed held-out
windows; at the end the whole held-out split is scored in bits per byte (`evaluate_stream`).

A recipe is OPTIMIZER:SCHEDULE:LR, or OPTIMIZER:SCHEDULE:LR:auto for a model sized by `cogni-mamba
plan` for the time budget (with --minutes: then every recipe trains for that wall-clock time instead of
a number of steps), or OPTIMIZER:SCHEDULE:LR:depthN for the planner's depth-N model (to see where its
pick stands among the rungs it did not take); the first one is the baseline:

    .venv/bin/python benchmarks/recipe.py                                     # nano: today's vs Muon + WSD
    .venv/bin/python benchmarks/recipe.py --recipes adamw:cosine:2e-3 muon:wsd:1e-3 muon:wsd:2e-3 \\
        muon:wsd:4e-3 adamw:wsd:2e-3 --steps 400
    .venv/bin/python benchmarks/recipe.py --preset tiny --steps 60 --set train.batch_size=4
    .venv/bin/python benchmarks/recipe.py --minutes 5 --recipes muon:wsd:2e-3 muon:wsd:2e-3:auto
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLE = REPO.parent / "shared" / "data" / "tinystories" / "TinyStories-sample.txt"
SEED = 1337
VAL_FRACTION = 0.1


def build_data(sample: Path, work: Path, vocab: int) -> tuple[Path, Path]:
    """(tokenizer dir, prepared dir): a BPE trained on the non-held-out stories, and both splits tokenized."""
    from cogni_mamba.data import prepare
    from cogni_mamba.data.prepare import is_val
    from cogni_mamba.data.sources import ReadStats, resolve_source
    from cogni_mamba.tokenizer import load_tokenizer, train_bpe

    tok_dir, data_dir = work / f"tokenizer-{vocab}", work / f"data-{vocab}"
    source = f"tinystories:{sample}"
    if not (tok_dir / "tokenizer.json").exists():
        docs = list(resolve_source(source).read(ReadStats()))
        train_docs = [d for d in docs if not is_val(d, SEED, VAL_FRACTION)]  # the held-out stories stay unseen
        train_bpe(train_docs, vocab, tok_dir, progress=False)
    prepare([source], load_tokenizer(tok_dir), data_dir, val_fraction=VAL_FRACTION, seed=SEED, progress=False)
    return tok_dir, data_dir


def recipe_config(preset_name: str, recipe: str, steps: int | None, minutes: float | None, overrides: list[str],
                  out: Path, data_dir: Path, vocab_size: int, precision: str = "auto"):
    from cogni_mamba.config import apply_overrides, preset, replace

    optimizer, schedule, lr = recipe.split(":")[:3]
    cfg = apply_overrides(preset(preset_name), overrides)
    lr = float(lr)
    train = replace(cfg.train, optimizer=optimizer, schedule=schedule, lr=lr, min_lr=lr / 10, max_steps=steps,
                    max_minutes=minutes, precision=precision, out_dir=str(out), save_interval=10**9, keep_last=1,
                    eval_interval=max(1, steps // 16) if steps else 25, epochs=1000)
    return replace(cfg, model=replace(cfg.model, vocab_size=vocab_size), train=train,
                   data=replace(cfg.data, data_dirs=[str(data_dir)]))


def worker(spec: dict) -> None:
    """Train one recipe and write result.json into its folder."""
    import torch

    from cogni_mamba.data import TokenBatches, fixed_batches
    from cogni_mamba.evaluate import eval_stream, evaluate_stream, prepared_tokens, token_byte_lengths
    from cogni_mamba.model import CogniMamba
    from cogni_mamba.tokenizer import load_tokenizer
    from cogni_mamba.train import build_trainer

    torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["tokenizer"])
    out = Path(spec["out"])
    cfg = recipe_config(spec["preset"], spec["recipe"], spec["steps"], spec["minutes"], spec["overrides"], out,
                        Path(spec["data"]), tok.vocab_size, spec["precision"])
    start = time.perf_counter()
    sizing = spec["recipe"].split(":")[3:]
    if sizing == ["auto"]:
        from cogni_mamba.plan import apply_plan, plan_for_budget

        plan = plan_for_budget(spec["minutes"], cfg, torch.device("cpu"))
        print(plan.describe(), flush=True)
        cfg = apply_plan(cfg, plan)
    elif sizing and sizing[0].startswith("depth"):  # one rung of the planner's ladder, for comparison
        from cogni_mamba.config import replace
        from cogni_mamba.plan import model_at_depth

        cfg = replace(cfg, model=model_at_depth(int(sizing[0][5:]), tok.vocab_size, cfg.data.seq_len))
    torch.manual_seed(cfg.train.seed)
    model = CogniMamba(cfg.model)
    T, B = cfg.data.seq_len, cfg.train.batch_size
    batches = TokenBatches(cfg.data.data_dirs, T, B, seed=cfg.data.seed)
    val = fixed_batches(cfg.data.data_dirs, T, B, cfg.train.eval_batches)
    trainer = build_trainer(model, batches, val, cfg.train, config=cfg, tokenizer=tok, out_dir=out,
                            device=torch.device("cpu"), progress=False, log=lambda m: None)
    trainer.train()
    seconds = time.perf_counter() - start  # planning included
    curve = [(r["step"], r["val_loss"]) for r in trainer.metrics.read() if r.get("val_loss") is not None]
    held_out = prepared_tokens(Path(spec["data"]), tok, "val")
    model.eval()
    result = evaluate_stream(model, eval_stream(held_out, tok.eos_id), token_byte_lengths(tok, tok.vocab_size),
                             seq_len=T, batch_size=8)
    tokens_per_step = B * cfg.train.grad_accum * T
    (out / "result.json").write_text(json.dumps({
        "recipe": spec["recipe"], "bits_per_byte": result.bits_per_byte, "held_out_tokens": result.tokens,
        "curve": curve, "tokens_per_step": tokens_per_step, "seconds": seconds, "steps": trainer.step,
        "parameters": model.num_parameters()}))


def run_all(specs: list[dict], parallel: int) -> list[dict]:
    """Run the workers `parallel` at a time (one thread each); return their results in order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    pending, running, done = list(specs), [], {}
    while pending or running:
        while pending and len(running) < parallel:
            spec = pending.pop(0)
            log = open(spec["out"] + ".log", "w")  # noqa: SIM115 (closed when the process ends)
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((spec, proc, log))
        time.sleep(1)
        for item in list(running):
            spec, proc, log = item
            if proc.poll() is None:
                continue
            log.close()
            running.remove(item)
            if proc.returncode != 0:
                tail = Path(log.name).read_text()[-2000:]
                raise SystemExit(f"recipe {spec['recipe']} failed (exit {proc.returncode}):\n{tail}")
            done[spec["recipe"]] = json.loads((Path(spec["out"]) / "result.json").read_text())
            print(f"  done: {spec['recipe']} in {done[spec['recipe']]['seconds']:.0f} s", flush=True)
    return [done[s["recipe"]] for s in specs]


def tokens_to_reach(curve: list[tuple[int, float]], target: float, tokens_per_step: int) -> float | None:
    """Tokens at which the held-out loss curve first reaches `target` (linear between evaluations)."""
    prev_step, prev_loss = 0, math.inf
    for step, loss in curve:
        if loss <= target:
            if math.isinf(prev_loss):
                return step * tokens_per_step
            frac = (prev_loss - target) / (prev_loss - loss)
            return (prev_step + frac * (step - prev_step)) * tokens_per_step
        prev_step, prev_loss = step, loss
    return None


def report(results: list[dict]) -> list[str]:
    base = results[0]
    target = base["curve"][-1][1]
    base_tokens = base["steps"] * base["tokens_per_step"]
    lines = [f"baseline {base['recipe']}: final held-out loss {target:.4f} nats/token after {base_tokens:,} tokens",
             "", "| recipe | parameters | steps | held-out bits/byte | vs baseline | tokens to baseline's final loss "
             "| share | s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        reach = tokens_to_reach(r["curve"], target, r["tokens_per_step"])
        share = f"{reach / base_tokens:.0%}" if reach is not None else "not reached"
        reach_text = f"{reach:,.0f}" if reach is not None else "-"
        lines.append(f"| {r['recipe']} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['bits_per_byte']:.4f} | {r['bits_per_byte'] / base['bits_per_byte'] - 1:+.1%}"
                     f" | {reach_text} | {share} | {r['seconds'] / r['steps']:.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nano")
    p.add_argument("--recipes", nargs="+", default=["adamw:cosine:2e-3", "muon:wsd:2e-3"],
                   help="OPTIMIZER:SCHEDULE:LR, the first is the baseline (default: today's nano vs Muon + WSD)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per recipe (the same tokens for all)")
    p.add_argument("--minutes", type=float, help="a wall-clock budget per recipe instead of --steps")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--parallel", type=int, default=2, help="recipes trained at once, one thread each")
    p.add_argument("--precision", default="auto", help="auto (bf16 on CPUs with native bf16), bf16 or fp32")
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temp folder)")
    p.add_argument("--sample", default=str(SAMPLE))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if not Path(args.sample).is_file():
        raise SystemExit(f"{args.sample} not found: this benchmark needs the shared TinyStories sample "
                         "(pass --sample PATH to a TinyStories .txt file).")
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="recipe-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, data_dir = build_data(Path(args.sample), work, args.vocab)
    meta = json.loads((data_dir / "meta.json").read_text())
    print(f"data: {meta['splits']['train']['tokens']:,} train / {meta['splits']['val']['tokens']:,} held-out tokens; "
          f"{args.preset}, {f'{args.minutes:g} minutes' if args.minutes else f'{args.steps} steps'} per recipe, "
          f"{args.parallel} at a time at one thread each; "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    if any(r.endswith(":auto") for r in args.recipes) and not args.minutes:
        raise SystemExit("an :auto recipe sizes its model for a time budget; pass --minutes too.")
    steps = None if args.minutes else args.steps
    specs = [{"recipe": r, "preset": args.preset, "steps": steps, "minutes": args.minutes, "overrides": args.overrides,
              "tokenizer": str(tok_dir), "data": str(data_dir), "threads": 1, "precision": args.precision,
              "out": str(work / f"{args.preset}-{r.replace(':', '-')}")} for r in args.recipes]
    results = run_all(specs, args.parallel)
    print("\n".join(["", *report(results)]))
    print(f"\n(load average at the end {os.getloadavg()[0]:.1f}; runs in {work})")


if __name__ == "__main__":
    main()
