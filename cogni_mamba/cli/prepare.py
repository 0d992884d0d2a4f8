"""`cogni-mamba prepare`: tokenize sources into train.bin / val.bin / meta.json for training."""

from __future__ import annotations

import argparse
import time

from ..data.sources import SOURCE_SPEC_HELP
from .common import add_command, add_source_arg

EPILOG = f"""sources (--source, repeatable; all of them go into one prepared folder):
{SOURCE_SPEC_HELP}

Each document is followed by one EOS token. The train/val split is by document, fixed by --seed.
Bytes that are not valid UTF-8 are replaced by U+FFFD and counted; empty documents are skipped and
counted. Re-running with the same inputs and settings does nothing; a folder prepared with another
tokenizer is refused unless --force.

examples:
  cogni-mamba prepare --source tinystories --tokenizer gpt2 --out data/tinystories
  cogni-mamba prepare --source tinystories:TinyStories-train.txt --tokenizer tok/ --out data/ts
  cogni-mamba prepare --source codesearchnet:python/final/jsonl --tokenizer tok/ --out data/code
  cogni-mamba prepare --source notes/ --source files:extra.jsonl --field body --tokenizer tok/ --out data/mine
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "prepare", "tokenize documents into memory-mapped train/val shards",
                    "Tokenize documents in parallel into train.bin, val.bin and meta.json.", EPILOG)
    add_source_arg(p, "what to read, e.g. tinystories, tinystories:PATH, codesearchnet:PATH, PATH (see below)")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder (or name) to encode with")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write train.bin, val.bin, meta.json")
    p.add_argument("--val-fraction", type=float, default=0.005,
                   help="share of documents that go to val.bin (default 0.005)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the train/val split (default 1337)")
    p.add_argument("--field", default="text", help="text field of .jsonl / .parquet files (default: text)")
    p.add_argument("--separator", default=None,
                   help="split .txt files into documents on this string (default: one document per file)")
    p.add_argument("--force", action="store_true",
                   help="rebuild even when up to date, and replace a folder made with another tokenizer")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..data import prepare
    from ..data.sources import SourceOptions, resolve_source
    from ..tokenizer import load_tokenizer

    options = SourceOptions(field=args.field, separator=args.separator)
    sources = [resolve_source(spec, options) for spec in args.source]  # bad paths fail before any work
    tokenizer = load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    meta = prepare(sources, tokenizer, args.out, val_fraction=args.val_fraction, seed=args.seed,
                   force=args.force, progress=not args.quiet)
    if meta["skipped_work"]:
        print(f"{args.out} is already prepared from these inputs with this tokenizer; nothing to do "
              "(--force rebuilds it).")
    else:
        print(f"prepared {args.out} in {time.perf_counter() - start:.1f} s ({meta['dtype']} tokens)")
    for split, c in meta["splits"].items():
        print(f"  {split:5} {c['tokens']:>14,} tokens  {c['documents']:>10,} documents")
    if meta["skipped"] or meta["replaced"]:
        print(f"  skipped {meta['skipped']:,} empty documents; replaced {meta['replaced']:,} invalid UTF-8 sequences")
    return 0
