"""Decoding speed: our KV-cache loop against transformers' `generate` on the same weights.

Both decode greedily from the same prompt for the same number of new tokens, at batch 1 and 8,
on the same device and threads; the weights are copied into `LlamaForCausalLM` with a plain key
map and the two outputs are checked to be the same tokens before anything is timed.

    .venv/bin/python benchmarks/decode_speed.py                # nano preset, random weights, CPU
    .venv/bin/python benchmarks/decode_speed.py --checkpoint runs/nano --new-tokens 200
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from cogni_mamba.config import GenerationConfig, preset
from cogni_mamba.export import to_transformers
from cogni_mamba.generate import decode_n
from cogni_mamba.model import CogniMamba


def ours(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    cfg = GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=new_tokens)
    steps = list(decode_n(model, ids.tolist(), cfg))
    return torch.tensor(steps).T  # (B, new_tokens)


def theirs(hf, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    return out[:, ids.shape[1]:]


def matmul_floor(model, batch: int, new_tokens: int) -> None:
    """Only the matrix products of decoding (every linear layer and the head, one token per row per step).

    Both implementations do exactly these, so transformers' time divided by this time bounds the
    ratio any decoder of the same math could reach.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, 1, w.shape[1]) for w in weights}
    with torch.inference_mode():
        for _ in range(new_tokens):
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint or run directory (default: random nano-preset weights)")
    p.add_argument("--preset", default="nano")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        from cogni_mamba.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint)
    else:
        # A larger init scale than training's keeps a random model from repeating one token, so the
        # token-for-token check below compares varied output; it does not change the timing.
        cfg = dataclasses.replace(preset(args.preset).model, init_std=0.3)
        torch.manual_seed(0)
        model = CogniMamba(cfg).eval()
    hf = to_transformers(model).eval()
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {args.prompt_tokens}-token prompt, "
          f"{args.new_tokens} new tokens, greedy, CPU threads: {torch.get_num_threads()}")
    print(f"{'batch':>5} {'ours tok/s':>11} {'transformers tok/s':>19} {'ratio':>6}   "
          f"{'matmuls-only tok/s':>18} {'ratio bound':>11}")
    for batch in args.batch:
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=g).repeat(batch, 1)
        a, b = ours(model, prompt, args.new_tokens), theirs(hf, prompt, args.new_tokens)
        if not torch.equal(a, b):
            first = int((a != b).any(0).nonzero()[0])
            print(f"  note: outputs differ from token {first} (float rounding between implementations)")
        t_ours = best_time(lambda p=prompt: ours(model, p, args.new_tokens), args.repeats)
        t_hf = best_time(lambda p=prompt: theirs(hf, p, args.new_tokens), args.repeats)
        t_mm = best_time(lambda b=batch: matmul_floor(model, b, args.new_tokens), args.repeats)
        n = batch * args.new_tokens
        print(f"{batch:>5} {n / t_ours:>11.0f} {n / t_hf:>19.0f} {t_hf / t_ours:>5.2f}x   "
              f"{n / t_mm:>18.0f} {t_hf / t_mm:>10.2f}x")


if __name__ == "__main__":
    main()
