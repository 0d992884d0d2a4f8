"""What bf16 and int8 weights cost in quality: greedy agreement with fp32 and the eval-loss delta.

For a checkpoint, the fp32 model and each variant `prepare_model` makes (fp32-prepared: fp32 with the
lean decode step, which should agree in full; bf16 weights; int8 Linear layers, on an x86 CPU our VNNI kernel,
each activation row quantized on its own, or fbgemm's dynamic int8, the activations quantized per call) decode greedily, one prompt at a time, from the first tokens of the
first --prompts documents of --data, for --tokens new tokens each. Agreement is measured against
fp32: the share of new tokens before a prompt's first difference (averaged; after a difference the
two continue different texts, so later positions say nothing), and how many prompts match in full.
Each variant's loss on --data (cogni_mamba.evaluate, non-overlapping windows of the model's
context) is printed beside fp32's.

    .venv/bin/python benchmarks/inference_precision.py --checkpoint runs/demo/run --data runs/demo/data
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cogni_mamba.checkpoint import load_checkpoint  # noqa: E402
from cogni_mamba.config import GenerationConfig  # noqa: E402
from cogni_mamba.evaluate import (  # noqa: E402
    eval_stream,
    evaluate_stream,
    load_eval_tokens,
    sample_prompts,
    token_byte_lengths,
)
from cogni_mamba.generate import decode_n  # noqa: E402
from cogni_mamba.inference.bf16_kernel import onednn_instead  # noqa: E402
from cogni_mamba.inference.int8_kernel import fbgemm_instead  # noqa: E402
from cogni_mamba.inference.precision import prepare_model  # noqa: E402

VARIANTS = {"fp32": (torch.float32, None), "fp32-prepared": (torch.float32, None), "bf16": (torch.bfloat16, None),
            "int8": (torch.bfloat16, "int8"), "int8-compiled": (torch.bfloat16, "int8"),
            "int8-fbgemm": (torch.bfloat16, "int8"), "bf16-onednn": (torch.bfloat16, None)}
# bf16-onednn: bf16 decode products on oneDNN's product instead of our bf16 kernel (COGNI_MAMBA_BF16=onednn);
# int8-compiled: one-row decode steps through the compiled graph (the eval loss, a full forward, is int8's);
# int8-fbgemm: the same int8 weights on fbgemm's product instead of our kernel (COGNI_MAMBA_INT8=fbgemm)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    settings = GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=n)
    return [step[0] for step in decode_n(model, [prompt], settings)]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="text file(s) or a prepared folder (its val split)")
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--eval-tokens", type=int, default=50_000, help="score at most this many tokens (default 50k)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, tokenizer = load_checkpoint(args.checkpoint)
    base = base.float().eval()
    tokens = load_eval_tokens(args.data, tokenizer)
    prompts = sample_prompts(tokens, tokenizer.eos_id, args.prompts, args.prompt_tokens)
    stream = eval_stream(np.asarray(tokens[:args.eval_tokens]), tokenizer.eos_id)
    byte_lengths = token_byte_lengths(tokenizer, base.config.vocab_size)
    load = os.getloadavg()[0]
    print(f"{args.checkpoint}: {base.num_parameters() / 1e6:.1f}M parameters; {len(prompts)} prompts of "
          f"{args.prompt_tokens} tokens x {args.tokens} new tokens, greedy; eval on {len(stream) - 1:,} tokens of "
          f"{args.data}; load {load:.2f}")

    reference, ref_loss = None, None
    print(f"{'variant':<14} {'agree (share before 1st diff)':>30} {'identical prompts':>18} {'eval loss':>10} "
          f"{'delta vs fp32':>14}")
    for name in ["fp32", *[v for v in args.variants if v != "fp32"]]:
        dtype, quantize = VARIANTS[name]
        with fbgemm_instead(name == "int8-fbgemm"), onednn_instead(name == "bf16-onednn"):
            model = base if name == "fp32" else prepare_model(_copy(base), dtype, quantize=quantize,
                                                              compile=name.endswith("-compiled"))
        outputs = [greedy(model, prompt, args.tokens) for prompt in prompts]
        loss = evaluate_stream(model, stream, byte_lengths, seq_len=base.config.max_seq_len, batch_size=4).loss
        if reference is None:
            reference, ref_loss = outputs, loss
        firsts = [first_difference(a, b) for a, b in zip(reference, outputs, strict=True)]
        share = sum(f / max(1, len(a)) for f, a in zip(firsts, reference, strict=True)) / len(firsts)
        same = sum(a == b for a, b in zip(reference, outputs, strict=True))
        print(f"{name:<14} {share:>30.3f} {f'{same}/{len(prompts)}':>18} {loss:>10.4f} {loss - ref_loss:>+14.4f}")


def _copy(model):
    from cogni_mamba.model import CogniMamba

    clone = CogniMamba(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


if __name__ == "__main__":
    main()
