"""A tiny training run for the trainer tests, runnable as a script (also under torchrun).

It needs no data package: `RandomTokens` draws global batches from its own torch.Generator (whose
state is the loader state), and each rank takes its rows of the global batch, so one process with
batch B*W sees exactly the tokens W processes with batch B see together.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogni_mamba.config import Config, ModelConfig, TrainConfig  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402

VOCAB = 64


class RandomTokens:
    """Endless (x, y) batches: rows [rank*B, (rank+1)*B) of a (B*world_size, T+1) random global batch."""

    def __init__(self, batch_size: int, seq_len: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batches_per_epoch: int | None = None, sleep: float = 0.0):
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self.sleep = sleep
        if batches_per_epoch is not None:
            self.batches_per_epoch = batches_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sleep:
            time.sleep(self.sleep)
        # Learnable structure: each row counts up from a random start (mod VOCAB).
        starts = torch.randint(0, VOCAB, (self.B * self.world, 1), generator=self.gen)
        rows = (starts + torch.arange(self.T + 1)) % VOCAB
        noise = torch.randint(0, VOCAB, rows.shape, generator=self.gen)
        rows = torch.where(torch.rand(rows.shape, generator=self.gen) < 0.1, noise, rows)
        mine = rows[self.rank * self.B:(self.rank + 1) * self.B]
        return mine[:, :-1].clone(), mine[:, 1:].clone()

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


def tiny_model_config(dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=64,
                       max_seq_len=64, dropout=dropout)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--save-interval", type=int, default=10)
    p.add_argument("--eval-interval", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--parallel", default="ddp", help="train.parallel under torchrun: ddp or fsdp")
    p.add_argument("--device", default="cpu", help="cpu, or cuda: each rank its own GPU (cuda:LOCAL_RANK)")
    p.add_argument("--optimizer", default="adamw", help="train.optimizer: adamw or muon")
    p.add_argument("--schedule", default="cosine", help="train.schedule: cosine or wsd")
    a = p.parse_args(argv)

    import os

    from cogni_mamba.train import build_trainer
    from cogni_mamba.train.distributed import exit_worker, init_distributed, pick_device, shutdown

    device = pick_device(a.device, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(1)
    info = init_distributed(device)
    torch.manual_seed(1234)
    model = CogniMamba(tiny_model_config(a.dropout))
    cfg = TrainConfig(batch_size=a.global_batch // info.world_size, grad_accum=a.accum, max_steps=a.steps,
                      lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_interval=a.eval_interval, eval_batches=2,
                      save_interval=a.save_interval, keep_last=2, precision="fp32", out_dir=a.out,
                      parallel=a.parallel, optimizer=a.optimizer, schedule=a.schedule)
    train = RandomTokens(cfg.batch_size, a.seq, seed=7, rank=info.rank, world_size=info.world_size,
                         batches_per_epoch=25, sleep=a.sleep)
    val = [next(RandomTokens(4, a.seq, seed=99 + i)) for i in range(2)]
    trainer = build_trainer(model, train, val, cfg, config=Config(model=model.config, train=cfg), device=device,
                            dist=info, progress=False, log=lambda m: print(m, flush=True))
    if a.resume:
        trainer.resume()
    result = trainer.train()
    print(result.summary(), flush=True)
    shutdown(info)
    exit_worker(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
