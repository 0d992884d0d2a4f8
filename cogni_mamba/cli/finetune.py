"""`cogni-mamba finetune`: turn a pretrained checkpoint into a chat model (SFT, assistant-only loss)."""

from __future__ import annotations

import argparse

from ..finetune.chat_data import CHAT_FORMAT_HELP
from .common import add_command

EPILOG = f"""{CHAT_FORMAT_HELP}
Each conversation is rendered with the tokenizer's chat template; only assistant tokens (and the
<|end|> that closes each reply) are trained on. Batches pad conversations on the right; none is
packed with another. Conversations longer than data.seq_len tokens are truncated to it (those with
no assistant token left are skipped); both are counted in the summary. Lines that are not valid
JSON, have an unknown role or no assistant reply are reported with their line number and skipped.
Half of the conversations without a system message get --system's text (chosen with data.seed), so
the model answers both `chat` (which sends a default system prompt) and API clients that send none.

Defaults start from the checkpoint's config: lr and min_lr are a tenth of the pretraining ones,
warmup at most 20 steps, 3 epochs (or --max-steps); any field can be changed with --set. The
output is a run folder (step-N/, best/, latest) that `chat` and `serve` load directly. --resume
continues an interrupted run in --out exactly where it stopped (same data and settings).

examples:
  cogni-mamba make-chat-data --source tinystories:TinyStories-valid.txt --out chats.jsonl --n 20000
  cogni-mamba finetune --checkpoint runs/nano --data chats.jsonl --out runs/nano-chat
  cogni-mamba finetune --checkpoint runs/nano --data chats.jsonl --out runs/nano-chat --resume
  cogni-mamba finetune --checkpoint runs/nano --data chats.jsonl --max-steps 500 --set train.lr=1e-4
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "finetune", "fine-tune a checkpoint on chat data (loss on assistant replies only)",
                    "Supervised chat fine-tuning of a pretrained checkpoint.", EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="pretrained checkpoint or run folder (its latest checkpoint is used)")
    p.add_argument("--data", required=True, metavar="FILE", help="chat data .jsonl (format below)")
    p.add_argument("--out", metavar="DIR", help="run folder for the fine-tuned model (default: <run>-chat)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of conversations held out for validation (default 0.05; 0 for none)")
    p.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default: train.epochs epochs)")
    p.add_argument("--force", action="store_true",
                   help="start even when the pre-flight check finds too little free disk or memory (warns instead)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--system", metavar="TEXT",
                   help="system message given to half of the conversations that have none (default: the one "
                        "`chat` sends, \"You are a helpful assistant.\"; \"\" for none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: a GPU when there is one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from ..finetune import plan_finetune, run_finetune

    plan = plan_finetune(args.checkpoint, args.data, out_dir=args.out, overrides=args.overrides,
                         val_fraction=args.val_fraction, max_steps=args.max_steps, resume=args.resume,
                         system_prompt=args.system, device=args.device, progress=not args.quiet,
                         force=args.force)
    print(plan.describe())
    result = run_finetune(plan)
    print(result.summary())
    print(f"chat with it: cogni-mamba chat --checkpoint {plan.out_dir}")
    return 0
