"""`cogni-mamba demo`: build the built-in corpus, train a tokenizer and the nano model on this CPU in a
few minutes, show what it learned, then chat with it (when stdin is a terminal)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_command

EPILOG = """The whole real pipeline, offline: corpus -> BPE tokenizer -> token shards -> Trainer -> Chatbot.
Everything lands under --out and is reused by the next run (pass --retrain to train again).

examples:
  cogni-mamba demo                      # about 5 minutes on 2 CPU cores, then a chat
  cogni-mamba demo --minutes 2 --no-chat
  cogni-mamba chat --checkpoint runs/demo/run    # chat again later
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "demo", "train a small chatbot from scratch on this machine in minutes (offline)", "Build the built-in corpus, train a BPE and the nano model within a time "
                                   "budget, print samples, and open a chat.", EPILOG)
    p.add_argument("--minutes", type=float, default=5.0,
                   help="time budget for building and training (default 5; samples and chat come after)")
    p.add_argument("--out", default="runs/demo", help="folder for the corpus, tokenizer, shards and run (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, the split and training (default 0)")
    p.add_argument("--corpus-size", default="3M", metavar="CHARS",
                   help="built-in corpus size in characters, e.g. 500k or 3M (default 3M)")
    p.add_argument("--retrain", action="store_true", help="train again even if the run folder has a checkpoint")
    p.add_argument("--fixed-nano", action="store_true",
                   help="train the nano preset instead of the size `cogni-mamba plan` picks for the budget here")
    p.add_argument("--force", action="store_true",
                   help="start even when the pre-flight check finds too little free disk or memory (warns instead)")
    p.add_argument("--no-chat", action="store_true", help="do not open the interactive chat at the end")
    p.add_argument("--report", metavar="FILE", help="also write the measured numbers and samples as JSON here")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field of the nano preset, e.g. --set train.lr=2e-3 (repeatable)")
    return p


def print_samples(report, out=sys.stdout) -> None:
    """The generated stories and the scripted conversation, for people to read."""
    print("\n=== stories the model wrote (prompted with their first words) ===", file=out)
    for i, story in enumerate(report.stories, 1):
        print(f"\n[{i}] {story.strip()}", file=out)
    print("\n=== a short conversation ===", file=out)
    for m in report.conversation:
        who = "you" if m["role"] == "user" else "bot"
        print(f"{who}: {m['content'].strip()}", file=out)
    checks = report.chat_checks
    if checks:
        print("\n=== does it follow the request? (fresh one-turn chats at temperature 0.8) ===", file=out)
        print(f"story about the animal asked for: {checks['story_on_topic']:.0%} of 10 "
              f"(unseen phrasings: {checks['held_out_story_on_topic']:.0%}); "
              f"\"What comes after N?\" right: {checks['number_right']:.0%} of 10 "
              f"(\"Which number follows N?\": {checks['held_out_number_right']:.0%})", file=out)


def run(args: argparse.Namespace) -> int:
    from ..corpus import parse_size
    from ..demo import DemoOptions, report_dict, run_demo

    options = DemoOptions(minutes=args.minutes, out=args.out, seed=args.seed, retrain=args.retrain, force=args.force,
                          auto_size=not args.fixed_nano,
                          corpus_size=parse_size(args.corpus_size), overrides=list(args.overrides))
    start = time.time()
    report, chatbot = run_demo(options, say=lambda s: print(s, flush=True))
    print_samples(report)
    print(f"\n(demo took {(time.time() - start) / 60:.1f} min)", flush=True)
    if args.report:
        from pathlib import Path

        Path(args.report).write_text(json.dumps(report_dict(report), indent=2) + "\n", encoding="utf-8")
    if sys.stdin.isatty() and not args.no_chat:
        from .chat import line_reader, run_session

        print(f"\nNow chat with it (checkpoint: {options.out}/run). /help lists the commands, Ctrl-D leaves.")
        run_session(chatbot, line_reader(sys.stdin, True), sys.stdout, sys.stderr, True)
    return 0
