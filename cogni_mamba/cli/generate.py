"""`cogni-mamba generate`: one-shot text completion from a checkpoint, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from ..config import GenerationConfig


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling options shared by `generate` and `chat`; unset ones keep the checkpoint's defaults."""
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation settings)")
    g.add_argument("--max-new-tokens", type=int, metavar="N")
    g.add_argument("--temperature", type=float, metavar="T", help="0 = greedy")
    g.add_argument("--top-k", type=int, metavar="K", help="0 disables top-k")
    g.add_argument("--top-p", type=float, metavar="P", help="1 disables top-p")
    g.add_argument("--min-p", type=float, metavar="P", help="0 disables min-p")
    g.add_argument("--repetition-penalty", type=float, metavar="R", help="1 disables it")
    g.add_argument("--seed", type=int, help="fixed seed: the same seed gives the same text")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default: cpu)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="weights' dtype (default auto: bf16 on CPUs and GPUs that compute it natively, else fp32)")
    p.add_argument("--int8", action="store_true",
                   help="int8 weights with one scale per output row (faster on CPUs; tokens may differ from fp32)")
    p.add_argument("--compile", action="store_true",
                   help="run one-row decode steps as one compiled graph (CPU with a C++ compiler; the first run "
                        "of a checkpoint waits 10-60 s while it compiles, later ones load it; fastest with --int8); "
                        "on a CUDA GPU, replay them as CUDA graphs")


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampling settings given on the command line, as GenerationConfig field values."""
    changes = {name: getattr(args, name) for name in
               ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
               if getattr(args, name, None) is not None}
    if changes.get("top_k") == 0:
        changes["top_k"] = None
    return changes


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="complete a prompt with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint or run directory")
    p.add_argument("--prompt", default="", help="text to continue (default: start from nothing)")
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="number of samples, decoded as one batch from one prefill of the prompt (with --seed S, "
                        "sample i uses seed S + i)")
    p.add_argument("--no-echo", action="store_true", help="print only the new text, not the prompt before it")
    add_sampling_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device
    from ..errors import CogniError
    from ..generate import settings_with
    from ..inference import Engine, TextStream, load_model_for_inference
    from ..inference.compiled_step import build_now

    if args.n < 1:
        raise CogniError(f"--n must be at least 1, got {args.n}.")
    model, tok, config = load_model_for_inference(args.checkpoint, resolve_device(args.device), args.dtype,
                                                  quantize="int8" if args.int8 else None, compile=args.compile)
    if tok is None:
        raise CogniError(f"Checkpoint {args.checkpoint} has no tokenizer/ folder; use one saved by `cogni-mamba train`.")
    build_now(model)
    cfg: GenerationConfig = settings_with(config.generation, **sampling_overrides(args))
    # Documents in the training data follow <|endoftext|>, so a completion starts after one too.
    prompt = [tok.bos_id, *tok.encode(args.prompt)]
    engine = Engine(model, max_batch=args.n, bos_id=tok.bos_id)
    requests = engine.submit_samples(prompt, cfg, args.n, stop_ids=[tok.eos_id])
    texts = [TextStream(tok.stream_decoder(), args.stop) for _ in requests]
    stream = args.n == 1  # one sample is printed as it is made; several are printed when all are done
    out = sys.stdout
    if stream and not args.no_echo:
        out.write(args.prompt)
    while not all(r.done for r in requests):
        engine.step()
        for request, text in zip(requests, texts, strict=True):
            tokens, _ = request.take()
            for token in tokens:
                piece = text.put(token)
                if stream and piece:
                    out.write(piece)
                    out.flush()
                if text.stopped:
                    request.cancel(reason="stop")
                    break
    for i, text in enumerate(texts):
        tail = text.flush()
        if stream:
            out.write(tail + "\n")
        else:
            out.write(f"--- sample {i + 1} ---\n{'' if args.no_echo else args.prompt}{text.text}\n")
    out.flush()
    return 0
