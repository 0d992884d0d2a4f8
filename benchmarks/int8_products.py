"""int8 matrix products side by side: our VNNI kernel (`inference/int8_kernel.py`) against fbgemm's dynamic int8
linear (what `--int8` ran before it) on the same int8 weights, for the products of one step of nano and tiny.

For each preset and each activation row count (1 = one decoding row, 8 = a full decode batch, 28 and 224 = one
and eight prompts prefilled together) it times all of a step's products (every block's q/k/v, output, gate/up and
down matrices, each a different tensor, so tiny's stream from memory as in decoding; the head is left out), the
two kernels in turns, and prints the median of each and their ratio. It also checks the two agree with the fp32
product of the dequantized weights (relative error of each).

    .venv/bin/python benchmarks/int8_products.py               # threads: torch's default
    .venv/bin/python benchmarks/int8_products.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogni_mamba.config import preset  # noqa: E402
from cogni_mamba.inference import int8_kernel  # noqa: E402
from cogni_mamba.inference.precision import Int8Linear, _fbgemm_pack, fbgemm_available  # noqa: E402


def step_shapes(name: str) -> list[tuple[int, int]]:
    """(out, in) of every block's fused q/k/v, output, fused gate/up and down products."""
    cfg = preset(name).model
    kv = cfg.n_kv_heads * cfg.head_dim
    return [(cfg.dim + 2 * kv, cfg.dim), (cfg.dim, cfg.dim), (2 * cfg.ffn_dim, cfg.dim), (cfg.dim, cfg.ffn_dim)] * cfg.n_layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["nano", "tiny"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 28, 224])
    p.add_argument("--threads", type=int)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not int8_kernel.available() or not fbgemm_available():
        sys.exit(f"needs both kernels: ours ({int8_kernel.why_unavailable() or 'ok'}) and fbgemm "
                 f"({'ok' if fbgemm_available() else 'missing'}).")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); medians of {args.repeats} alternated runs")
    print("| preset | rows | fbgemm ms | ours ms | ours / fbgemm speed | rel. error fbgemm | rel. error ours |")
    print("|---|---|---|---|---|---|---|")
    torch.manual_seed(0)
    for name in args.presets:
        layers = []
        for out_features, in_features in step_shapes(name):
            layer = Int8Linear(nn.Linear(in_features, out_features, bias=False))
            layer.packed = _fbgemm_pack(layer.weight, layer.scale)  # fbgemm's packing of the same int8 rows
            layers.append(layer)
        for rows in args.rows:
            inputs = [torch.randn(rows, layer.in_features) for layer in layers]
            pairs = list(zip(layers, inputs, strict=True))
            runs = {"fbgemm": lambda pairs=pairs: [torch.ops.quantized.linear_dynamic(x, layer.packed, False)
                                                   for layer, x in pairs],
                    "ours": lambda pairs=pairs: [int8_kernel.linear(x, *layer.vnni, layer.out_features)
                                                 for layer, x in pairs]}
            times = {key: [] for key in runs}
            for _ in range(args.repeats):
                for key, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[key].append(time.perf_counter() - start)
            exact = [x @ layer.dequantized().T for layer, x in zip(layers[:4], inputs[:4], strict=True)]
            errors = {key: max(float((y - e).norm() / e.norm()) for y, e in zip(run()[:4], exact, strict=True))
                      for key, run in runs.items()}
            a, b = statistics.median(times["fbgemm"]), statistics.median(times["ours"])
            print(f"| {name} | {rows} | {a * 1e3:.3f} | {b * 1e3:.3f} | {a / b:.2f}x | {errors['fbgemm']:.4f} | "
                  f"{errors['ours']:.4f} |")


if __name__ == "__main__":
    main()
