"""`cogni-mamba make-chat-data`: chat fine-tuning data made from TinyStories or CodeSearchNet."""

from __future__ import annotations

import argparse

from ..finetune.make_data import MAKE_SOURCE_HELP
from .common import add_command, add_source_arg

EPILOG = f"""sources (--source, repeatable):
{MAKE_SOURCE_HELP}
conversations made (one per story or function; the kind is picked at random with --seed):
  TinyStories:   "Tell me a story about a dog." -> a story with a dog in it (the noun comes from
                 the story itself), or "Continue this story: <first 1-3 sentences>" -> the rest
  CodeSearchNet: "Write a Python function that does this:\\n<docstring>" -> the code, or
                 "What does this function do?\\n<code>" -> the docstring's first paragraph
                 (functions without a docstring are left out)

Output: one {{"messages": [...]}} JSON object per line, the format `cogni-mamba finetune --data`
reads. The same inputs, --n and --seed always give the same file.

examples:
  cogni-mamba make-chat-data --source tinystories:TinyStories-valid.txt --out chats.jsonl --n 20000
  cogni-mamba make-chat-data --source tinystories:ts.txt --source codesearchnet:python/ --out mix.jsonl
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "make-chat-data", "make chat fine-tuning data from TinyStories / CodeSearchNet",
                    "Turn pretraining documents into chat conversations (no external model).", EPILOG)
    add_source_arg(p, "tinystories[:PATH] or codesearchnet[:PATH] (see below)")
    p.add_argument("--out", required=True, metavar="FILE", help="the .jsonl file to write")
    p.add_argument("--n", type=int, metavar="N",
                   help="conversations to keep, chosen at random from all those made (default: all)")
    p.add_argument("--seed", type=int, default=1337, help="seed for the prompts and the sample (default 1337)")
    return p


def run(args: argparse.Namespace) -> int:
    from itertools import chain

    from ..errors import CogniError
    from ..finetune.chat_data import write_chat_file
    from ..finetune.make_data import sample_in_order, source_chats

    if args.n is not None and args.n <= 0:
        raise CogniError(f"--n must be a positive number of conversations, got {args.n}.")
    streams = [source_chats(spec, args.seed + i) for i, spec in enumerate(args.source)]
    chats = sample_in_order(chain.from_iterable(streams), args.n, args.seed)
    if not chats:
        raise CogniError("The sources gave no conversation (no story with a noun or 3 sentences, no function "
                         "with a docstring); check the --source paths.")
    n = write_chat_file(chats, args.out)
    short = f" (asked for {args.n:,}; the sources gave fewer)" if args.n is not None and n < args.n else ""
    print(f"wrote {n:,} conversations to {args.out}{short}")
    return 0
