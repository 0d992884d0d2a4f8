"""Sizing from a budget: the candidate ladder, the pick against the Chinchilla fit computed here, the
memory limit and the too-small budget, with the timing replaced by given throughputs."""

from __future__ import annotations

import pytest
import torch

from cogni_mamba import plan as planning
from cogni_mamba.config import preset
from cogni_mamba.errors import CogniError
from cogni_mamba.model import CogniMamba


def test_depth_ladder_shapes_and_counts():
    m = planning.model_at_depth(4, vocab_size=4096, seq_len=256)
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_dim, m.max_seq_len) == (256, 4, 4, 1, 768, 256)
    # parameters by hand: tied embedding + per layer (q, o: dim^2 each; k, v: dim*64 each; 3 ffn; 2 norms) + norm
    per_layer = 2 * 256 * 256 + 2 * 256 * 64 + 3 * 256 * 768 + 2 * 256
    assert CogniMamba(m).num_parameters() == 4096 * 256 + 4 * per_layer + 256
    for depth in planning.DEPTHS:
        planning.model_at_depth(depth, 4096, 256)  # every rung is a valid config


def fake_throughput(monkeypatch, tokens_per_s):
    """Replace the timing by tokens_per_s(params) and a frozen clock, so the budget is all training."""
    seen = []

    def measure(model_cfg, cfg, device, seconds):
        params = CogniMamba(model_cfg).num_parameters()
        seen.append(model_cfg.n_layers)
        return tokens_per_s(params), "fp32"

    monkeypatch.setattr(planning, "measure", measure)
    monkeypatch.setattr(planning.time, "perf_counter", lambda: 0.0)
    return seen


def chinchilla(n: float, d: float) -> float:
    return 1.69 + 406.4 / n ** 0.34 + 410.7 / d ** 0.28


def test_pick_is_the_lowest_fitted_loss(monkeypatch):
    cfg = preset("nano")
    rate = lambda n: 3e4 * (n / 1e6) ** -1.5  # noqa: E731 (slower for larger models, steeper than 1/N)
    seen = fake_throughput(monkeypatch, rate)
    plan = planning.plan_for_budget(10, cfg, torch.device("cpu"))
    budget_tokens = lambda n: int(rate(n) * 600 * (1 - planning.EVAL_SHARE))  # noqa: E731
    losses = {c.depth: chinchilla(c.params, budget_tokens(c.params)) for c in plan.candidates}
    assert plan.chosen.depth == min(losses, key=losses.get)
    assert plan.chosen.tokens == budget_tokens(plan.chosen.params)
    # timing stopped two rungs after the minimum (the fit rose twice), not at the end of the ladder
    best = planning.DEPTHS.index(plan.chosen.depth)
    assert seen == list(planning.DEPTHS[:best + 3])
    assert "<- chosen" in plan.describe()


def test_a_slower_decline_picks_a_larger_model(monkeypatch):
    cfg = preset("nano")
    fake_throughput(monkeypatch, lambda n: 3e4 * (n / 1e6) ** -1.5)
    steep = planning.plan_for_budget(10, cfg, torch.device("cpu")).chosen
    fake_throughput(monkeypatch, lambda n: 3e4 * (n / 1e6) ** -0.5)
    gentle = planning.plan_for_budget(10, cfg, torch.device("cpu")).chosen
    assert gentle.params > steep.params


def test_memory_limit_excludes_larger_models(monkeypatch):
    cfg = preset("nano")
    fake_throughput(monkeypatch, lambda n: 3e4 * (n / 1e6) ** -0.2)  # barely slower: larger would win
    depth3 = planning.model_at_depth(3, cfg.model.vocab_size, cfg.data.seq_len)
    limit = planning.train_memory(depth3, cfg.train.batch_size, cfg.data.seq_len, mixed=True).total
    monkeypatch.setattr(planning, "free_memory", lambda device: int(limit / planning.MEMORY_SHARE) + 1)
    plan = planning.plan_for_budget(60, cfg, torch.device("cpu"))
    assert plan.chosen.depth == 3
    assert not plan.candidates[-1].fits and "does not fit in memory" in plan.describe()

    monkeypatch.setattr(planning, "free_memory", lambda device: 1024)
    with pytest.raises(CogniError, match="Even the smallest model .* needs .* to train but 0.0 MiB is free; lower train.batch_size"):
        planning.plan_for_budget(60, cfg, torch.device("cpu"))


def test_a_budget_too_small_is_one_sentence(monkeypatch):
    cfg = preset("nano")
    fake_throughput(monkeypatch, lambda n: 100.0)
    with pytest.raises(CogniError, match=r"0.1 minutes are too few for any model here: .* under 50; give more"):
        planning.plan_for_budget(0.1, cfg, torch.device("cpu"))


def test_apply_plan_sets_the_model_and_the_time_left(monkeypatch):
    cfg = preset("nano")
    fake_throughput(monkeypatch, lambda n: 3e4 * (n / 1e6) ** -1.5)
    plan = planning.plan_for_budget(5, cfg, torch.device("cpu"))
    planned = planning.apply_plan(cfg, plan)
    assert planned.model == plan.chosen.model and planned.train.max_minutes == 5
    assert planned.preset == f"auto-depth{plan.chosen.depth}"


def test_measure_times_the_real_step():
    cfg = preset("nano")
    m = planning.model_at_depth(2, 512, 32)
    cfg = planning.replace(cfg, data=planning.replace(cfg.data, seq_len=32),
                           train=planning.replace(cfg.train, batch_size=2, precision="fp32"))
    tok_s, precision = planning.measure(m, cfg, torch.device("cpu"), seconds=0.2)
    assert tok_s > 0 and precision == "fp32"
