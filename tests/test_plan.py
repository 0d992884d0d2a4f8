"""Sizing from a budget: the candidate ladder, the pick against the Chinchilla fit computed here, the
memory limit and the too-small budget, with the timing replaced by given throughputs."""

from __future__ import annotations

import math

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


def test_effective_tokens_closed_form():
    # Muennighoff et al.: D' = U + U R* (1 - exp(-R / R*)). At R = R* ln 2 the bracket is exactly 1/2.
    r_star = 15.4
    assert planning.effective_tokens(1_000, 1_000) == 1_000  # one epoch: all fresh
    assert planning.effective_tokens(700, 1_000) == 700  # less than one epoch
    assert planning.effective_tokens(5_000, None) == 5_000  # data size unknown: no discount
    tokens = 1_000 * (1 + r_star * math.log(2))
    assert planning.effective_tokens(tokens, 1_000) == pytest.approx(1_000 * (1 + r_star / 2))
    # many repeats: never worth more than U (1 + R*)
    assert planning.effective_tokens(1e9, 1_000) == pytest.approx(1_000 * (1 + r_star), rel=1e-6)


def test_a_small_corpus_moves_the_pick_to_a_larger_model(monkeypatch):
    cfg = preset("nano")
    rate = lambda n: 3e4 * (n / 1e6) ** -0.8  # noqa: E731
    fake_throughput(monkeypatch, rate)
    fresh = planning.plan_for_budget(10, cfg, torch.device("cpu"), unique_tokens=None)
    unique = fresh.chosen.tokens // 20  # the small model would read its data 20 times
    small = planning.plan_for_budget(10, cfg, torch.device("cpu"), unique_tokens=unique)
    assert small.chosen.params > fresh.chosen.params

    def discounted(c):  # the fit with the repeats discounted, written out here
        d = c.tokens if c.tokens <= unique else unique * (1 + 15.4 * (1 - math.exp(-(c.tokens / unique - 1) / 15.4)))
        return chinchilla(c.params, d)

    assert small.chosen.depth == min(small.candidates, key=discounted).depth
    assert "epochs" in small.describe()


def test_unique_tokens_come_from_the_prepared_data(tmp_path):
    from cogni_mamba.data import prepare
    from cogni_mamba.tokenizer import SimpleTokenizer

    docs = tmp_path / "docs.txt"
    docs.write_text("one small text", encoding="utf-8")
    prepare([str(docs)], SimpleTokenizer(), tmp_path / "data", val_fraction=0.0, progress=False)
    cfg = preset("nano")
    cfg = planning.replace(cfg, data=planning.replace(cfg.data, data_dirs=[str(tmp_path / "data")]))
    assert planning.unique_train_tokens(cfg) == len(b"one small text") + 1  # the bytes, then EOS
    cfg = planning.replace(cfg, data=planning.replace(cfg.data, data_dirs=[str(tmp_path / "nothing")]))
    assert planning.unique_train_tokens(cfg) is None
