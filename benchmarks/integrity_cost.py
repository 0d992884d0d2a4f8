"""What the reliability checks cost: sha256 verification per GB, and the pre-flight check of a run.

    .venv/bin/python benchmarks/integrity_cost.py            # 1 GiB file in the temp folder
    .venv/bin/python benchmarks/integrity_cost.py --gib 4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cogni_mamba.config import preset  # noqa: E402
from cogni_mamba.integrity import sha256_file  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402
from cogni_mamba.train import preflight  # noqa: E402
from cogni_mamba.train.optim import build_optimizer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        block = os.urandom(1 << 24)
        with open(path, "wb") as f:
            for _ in range(int(args.gib * 64)):
                f.write(block)
        size = path.stat().st_size
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            sha256_file(path)
            times.append(time.perf_counter() - t0)
        best = min(times)
        print(f"sha256 of {size / 2**30:.2f} GiB (page cache warm): best {best:.2f} s of {args.repeats} "
              f"= {best / (size / 2**30):.2f} s per GiB ({size / best / 2**30:.2f} GiB/s); load {os.getloadavg()[0]:.1f}")
    for name in ("nano", "medium"):
        cfg = preset(name)
        with torch.device("meta"):  # sizes only: no memory is allocated
            model = CogniMamba(cfg.model)
        t0 = time.perf_counter()
        opt = build_optimizer(model, cfg.train, "cpu")
        one = preflight.checkpoint_bytes(model, opt)
        warnings, refusal = preflight.check(out_dir=Path(tempfile.gettempdir()), one_checkpoint=one,
                                            keep=cfg.train.keep_last,
                                            memory_needed=preflight.run_memory(cfg.model, 4, 512, "bf16"),
                                            device=torch.device("cpu"), force=True)
        ms = (time.perf_counter() - t0) * 1000
        print(f"pre-flight for {name}: {ms:.1f} ms (one checkpoint ~{one / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
