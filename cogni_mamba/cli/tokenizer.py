"""`cogni-mamba tokenizer`: train a byte-level BPE on your corpus, or look at how a tokenizer splits text."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_command

EPILOG = """examples:
  cogni-mamba tokenizer train --data TinyStories-train.txt --vocab-size 4096 --out tok/
  cogni-mamba tokenizer train --data code.jsonl more.parquet --text-field content --vocab-size 8192 --out tok/
  cogni-mamba tokenizer encode --tokenizer tok/ "Once upon a time"

.txt files are split into documents on <|endoftext|> lines (else one per line); every 20th document is
held out to measure compression. The vocabulary has exactly --vocab-size tokens (6 specials + 256 bytes
+ merges); the model's vocabulary rounds it up to a multiple of 64, so multiples of 64 waste nothing.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "tokenizer", "train a BPE tokenizer on your corpus, or encode text with one",
                    "Train a byte-level BPE tokenizer, or show how a tokenizer encodes text.", EPILOG)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = actions.add_parser("train", help="train a byte-level BPE and save it to a folder")
    t.add_argument("--data", nargs="+", required=True, metavar="FILE", help=".txt, .jsonl or .parquet corpus files")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary, e.g. 4096")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json into")
    t.add_argument("--text-field", default="text", help="text field of .jsonl / .parquet files (default: text)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    e = actions.add_parser("encode", help="print the ids and pieces of a text")
    e.add_argument("--tokenizer", default="gpt2", metavar="DIR", help="tokenizer folder or name (default: gpt2)")
    e.add_argument("text", help="the text to encode")
    return p


def run(args: argparse.Namespace) -> int:
    if args.action == "train":
        return run_train(args)
    return run_encode(args)


def run_train(args: argparse.Namespace) -> int:
    from ..tokenizer import train_bpe

    tok = train_bpe([Path(f) for f in args.data], args.vocab_size, args.out, progress=not args.quiet,
                    text_field=args.text_field)
    r = tok.train_report
    print(f"saved {tok.name} to {args.out} (model vocabulary {tok.vocab_size}, fingerprint {tok.fingerprint})")
    print(f"compression on {r['measured_on']} documents ({r[r['measured_on'] + '_docs']:,}): "
          f"{r['bytes_per_token']:.2f} bytes per token ({r['bytes']:,} bytes -> {r['tokens']:,} tokens)")
    return 0


def run_encode(args: argparse.Namespace) -> int:
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text)
    print(ids)
    print(" | ".join(repr(tok.decode([i]))[1:-1] for i in ids))
    print(f"{len(ids)} tokens, {len(args.text.encode('utf-8'))} bytes ({tok.name}, vocab {tok.vocab_size})")
    return 0
