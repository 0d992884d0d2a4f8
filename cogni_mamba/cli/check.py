"""`cogni-mamba check`: validate the config and run one forward and backward pass on the best device."""

from __future__ import annotations

import argparse
import time

from .common import add_config_args, config_from_args


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("check", help="validate the config and run a forward + backward pass on this machine")
    add_config_args(p)
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..device import attention_backend, resolve_device, supports_bf16, supports_fp16
    from ..errors import CogniError, is_out_of_memory
    from ..model import CogniMamba

    cfg = config_from_args(args)
    m = cfg.model
    device = resolve_device(args.device)
    seq = min(args.seq, m.max_seq_len)
    print(f"config ok: preset {cfg.preset or 'custom'}, dim {m.dim}, {m.n_layers} layers, "
          f"{m.n_heads}/{m.n_kv_heads} heads, vocab {m.vocab_size}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"device: {name} (torch {torch.__version__})")
    bf16, fp16 = supports_bf16(device), supports_fp16(device)
    print(f"bf16 autocast: {'yes' if bf16 else 'no'}; fp16 autocast: {'yes' if fp16 else 'no'}")
    dtype = torch.bfloat16 if bf16 else torch.float32
    kernel = attention_backend(device, dtype, m.head_dim, m.n_heads, m.n_kv_heads)
    print(f"attention kernel ({str(dtype).replace('torch.', '')}, {m.n_heads}/{m.n_kv_heads} heads): {kernel}")

    torch.manual_seed(0)
    try:
        model = CogniMamba(m).to(device)
        ids = torch.randint(0, m.vocab_size, (args.batch, seq + 1), device=device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=bf16):
            _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
    except (RuntimeError, MemoryError) as e:  # CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError
        if not is_out_of_memory(e):
            raise
        raise CogniError(f"Out of memory building or running {cfg.preset or 'this config'} at batch {args.batch} x "
                         f"{seq} on {device}; try a smaller --batch, --seq or preset (or a smaller model.vocab_size, "
                         "dim or max_seq_len).") from None
    elapsed = time.perf_counter() - start
    grads = [p.grad for p in model.parameters()]
    if not torch.isfinite(loss) or any(g is None or not torch.isfinite(g).all() for g in grads):
        raise CogniError("The forward/backward pass produced a non-finite loss or gradient; "
                         "check model.init_std and model.norm_eps.")
    print(f"forward + backward at batch {args.batch} x {seq}: loss {loss.item():.3f} "
          f"(ln(vocab) = {torch.log(torch.tensor(float(m.vocab_size))).item():.3f}), {elapsed:.2f} s")
    print("check passed")
    return 0
