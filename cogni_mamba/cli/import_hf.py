"""`cogni-mamba import`: a local Hugging Face Llama checkpoint becomes a Cogni-Mamba checkpoint.

(The module is import_hf because `import` is a Python keyword; the subcommand is `import`.)
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("import", help="convert a local Hugging Face Llama checkpoint",
                       description="Convert a local Hugging Face Llama folder (config.json, safetensors, "
                                   "tokenizer.json) into a Cogni-Mamba checkpoint directory. Only what CogniMamba "
                                   "computes exactly is accepted: no biases, SiLU, plain rotary embeddings.")
    p.add_argument("--hf", required=True, metavar="DIR", help="the Hugging Face model folder (local)")
    p.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer to use instead of the folder's tokenizer.json")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p


def run(args: argparse.Namespace) -> int:
    from ..export import import_to_checkpoint

    out = import_to_checkpoint(args.hf, args.out, tokenizer=args.tokenizer, force=args.force)
    print(f"wrote checkpoint {out}; try `cogni-mamba eval --checkpoint {out} --data ...` or "
          f"`cogni-mamba chat --checkpoint {out}`")
    return 0
