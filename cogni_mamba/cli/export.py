"""`cogni-mamba export`: a checkpoint as a Hugging Face Llama folder or a llama.cpp GGUF file."""

from __future__ import annotations

import argparse

from .common import add_command

EPILOG = """examples:
  cogni-mamba export --checkpoint runs/nano --format hf --out exports/nano-hf
  cogni-mamba export --checkpoint runs/nano/best --format gguf --dtype q8_0 --out exports/nano-q8_0.gguf

The hf folder loads offline with transformers' AutoModelForCausalLM and AutoTokenizer (chat template
included); the gguf file runs in llama.cpp (e.g. `llama-cli -m exports/nano-q8_0.gguf`).
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "export", "export a checkpoint to Hugging Face or GGUF",
                    "Export a checkpoint to a Hugging Face Llama folder or a GGUF file.", EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--format", required=True, choices=("hf", "gguf"), help="hf (folder) or gguf (one file)")
    p.add_argument("--out", required=True, metavar="PATH", help="folder (hf) or file (gguf) to write")
    p.add_argument("--dtype", default=None,
                   help="hf: float32, float16 or bfloat16 (default: as trained); gguf: f32, f16 or q8_0 "
                        "(default: f16)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to export with (default: the checkpoint's)")
    p.add_argument("--best", action="store_true", help="in a run directory, take best/ instead of latest")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint_full
    from ..export import export_gguf, export_hf
    from ..tokenizer import load_tokenizer

    model, tok, config = load_checkpoint_full(args.checkpoint, prefer_best=args.best)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    if args.format == "hf":
        out = export_hf(model, tok, config, args.out, dtype=args.dtype, force=args.force)
        print(f"wrote a Hugging Face Llama folder to {out}")
    else:
        out = export_gguf(model, tok, config, args.out, dtype=args.dtype or "f16", force=args.force)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.dtype or 'f16'})")
    return 0
