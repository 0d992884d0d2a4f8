"""`cogni-mamba eval`: loss, perplexity and bits per byte of a checkpoint on held-out text or a prepared split."""

from __future__ import annotations

import argparse

from .common import add_command

EPILOG = """what is scored (see cogni_mamba/evaluate.py):
  The documents form one stream laid out like prepared data (doc EOS doc EOS ...) behind one leading
  EOS; every token after it, each document's closing EOS included, is predicted exactly once. Windows
  of --seq tokens start every --stride tokens, and each scores only targets no earlier window scored.
  Bytes are the UTF-8 bytes the scored tokens stand for (special tokens count 0), so bits per byte =
  total loss in nats / ln 2 / bytes compares across tokenizers.

examples:
  cogni-mamba eval --checkpoint runs/nano --data data/tinystories          # its val.bin
  cogni-mamba eval --checkpoint runs/nano/best --data held_out.txt --samples 3
  cogni-mamba eval --checkpoint runs/nano --data stories.txt --separator '<|endoftext|>' --stride 128
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "eval", "loss, perplexity and bits per byte on held-out text",
                    "Measure loss, perplexity and bits per byte of a checkpoint.", EPILOG)
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a .txt / .jsonl / .jsonl.gz / .parquet file or folder, or a prepared dataset folder")
    p.add_argument("--split", default="val", help="split of a prepared folder (default: val)")
    p.add_argument("--field", default="text", help="text field of .jsonl / .parquet files (default: text)")
    p.add_argument("--separator", default=None,
                   help="split .txt files into documents on this string (default: one document per file)")
    p.add_argument("--seq", type=int, metavar="T", help="window length (default: the model's context)")
    p.add_argument("--stride", type=int, metavar="S", help="distance between windows (default: half the window)")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="windows per forward pass (default: 4)")
    p.add_argument("--samples", type=int, default=0, metavar="N",
                   help="also print N generations, continuing the first words of N documents")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_sizes(args: argparse.Namespace, max_seq_len: int) -> tuple[int, int]:
    """(window, stride) from the arguments, or a CogniError naming the bad one."""
    from ..errors import CogniError

    seq = args.seq or max_seq_len
    if not 0 < seq <= max_seq_len:
        raise CogniError(f"--seq must be between 1 and the model's context {max_seq_len}, got {seq}.")
    stride = args.stride or max(1, seq // 2)
    if not 0 < stride <= seq:
        raise CogniError(f"--stride must be between 1 and the window length {seq}, got {stride}.")
    if args.batch < 1 or args.samples < 0:
        raise CogniError("--batch must be at least 1 and --samples at least 0.")
    return seq, stride


def print_samples(model, tok, tokens, config, n: int) -> None:
    """Continue the first words of n documents with the checkpoint's sampling settings."""
    from ..evaluate import sample_prompts
    from ..generate import settings_with
    from ..inference import Engine

    settings = settings_with(config.generation, max_new_tokens=min(64, config.generation.max_new_tokens))
    prompts = sample_prompts(tokens, tok.eos_id, n)
    if not prompts:
        return
    engine = Engine(model, max_batch=len(prompts), bos_id=tok.bos_id)  # the samples run as one batch
    requests = [engine.submit([tok.bos_id, *prompt], settings, stop_ids=[tok.eos_id]) for prompt in prompts]
    for i, (prompt, request) in enumerate(zip(prompts, requests, strict=True)):
        print(f"--- sample {i + 1} ---\n{tok.decode(prompt)}[{tok.decode(list(request))}]")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_checkpoint_full
    from ..device import resolve_device
    from ..errors import CogniError
    from ..evaluate import eval_stream, evaluate_stream, load_eval_tokens, token_byte_lengths

    model, tok, config = load_checkpoint_full(args.checkpoint, resolve_device(args.device))
    if tok is None:
        raise CogniError(f"Checkpoint {args.checkpoint} has no tokenizer/ folder, which eval needs to read text "
                         "and count bytes; use a checkpoint saved by `cogni-mamba train`.")
    seq, stride = check_sizes(args, model.config.max_seq_len)
    tokens = load_eval_tokens(args.data, tok, split=args.split, field=args.field, separator=args.separator)
    stream = eval_stream(tokens, tok.eos_id)
    result = evaluate_stream(model, stream, token_byte_lengths(tok, model.config.vocab_size), seq_len=seq,
                             stride=stride, batch_size=args.batch, progress=not args.quiet)
    print(f"data            {args.data}")
    print(f"tokens scored   {result.tokens:,} ({result.bytes:,} UTF-8 bytes, {result.bytes_per_token:.2f} per token)")
    print(f"windows         {seq} tokens every {stride}")
    print(f"loss            {result.loss:.4f} nats/token")
    print(f"perplexity      {result.perplexity:.3f}")
    print(f"bits per byte   {result.bits_per_byte:.4f}")
    if args.samples:
        print_samples(model, tok, tokens, config, args.samples)
    return 0
