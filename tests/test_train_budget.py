"""Training for a time budget: the step plan fitted to the pace (shorter, or longer for a warmup-stable-decay
schedule still in its stable phase), capped by max_steps, kept across a resume, ending at min_lr; each
checked against a closed form or a hand count, with the trainer's clock replaced by a fake one."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from train_worker import RandomTokens  # noqa: E402

from tests.test_train import make_trainer, metrics_records  # noqa: E402


def test_fit_to_budget_by_hand():
    from cogni_mamba.train.trainer import fit_to_budget

    # 10 steps in 20 s (2 s a step) of a 100 s budget: 40 more steps fit -> 50, below the planned 200
    assert fit_to_budget(10, 10, 20.0, 100.0, 200) == 50
    assert fit_to_budget(10, 10, 20.0, 100.0, 30) == 30  # never more than planned
    assert fit_to_budget(10, 10, 120.0, 100.0, 200) == 10  # out of time: end here
    assert fit_to_budget(10, 0, 0.0, 100.0, 200) == 200  # no pace yet
    # a plan allowed to grow: as many as fit (40 more), up to the limit when there is one
    assert fit_to_budget(10, 10, 20.0, 100.0, 30, may_grow=True) == 50
    assert fit_to_budget(10, 10, 20.0, 100.0, 30, may_grow=True, limit=45) == 45
    assert fit_to_budget(10, 10, 20.0, 100.0, 200, may_grow=True, limit=None) == 50  # and shrinks like any plan


def one_second_steps(monkeypatch) -> None:
    """The trainer's wall clock advances one second each time the loop reads it (once per step)."""
    import time
    import types

    from cogni_mamba.train import trainer as trainer_module

    clock = {"now": 1000.0}

    def fake_time() -> float:
        clock["now"] += 1.0
        return clock["now"]

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(time=fake_time, perf_counter=time.perf_counter))


@pytest.mark.parametrize("schedule, expected", [("wsd", "grows"), ("cosine", "first plan")])
def test_a_faster_pace_lengthens_a_stable_wsd_schedule_to_the_time_budget(tmp_path, monkeypatch, schedule, expected):
    # The first plan is one epoch of 10 steps, but 30 s at one second a step fit about 28: a WSD run still
    # in its stable phase grows to fill the budget (no step limit was given); a cosine must not grow (its
    # rate would rise again), so it ends at its first plan.
    one_second_steps(monkeypatch)
    t = make_trainer(tmp_path, max_steps=None, epochs=1, max_minutes=0.5, eval_interval=4, save_interval=1000,
                     schedule=schedule, warmup_steps=2,
                     batches=RandomTokens(4, 16, seed=1, batches_per_epoch=10))
    assert t.total_steps == 10 and t.step_limit is None
    result = t.train()
    assert result.stopped == "finished" and result.steps == t.total_steps
    if expected == "grows":
        assert 20 <= result.steps <= 30
        lr_of_step = {m["step"]: m["lr"] for m in metrics_records(tmp_path / "run") if "lr" in m}
        n = result.steps
        start = n - round(0.2 * n)  # the decay: the last fifth, linear from 3e-3 to 3e-4 at step n
        for s in range(start + 1, n + 1):  # logged step s ran optimizer step s - 1
            assert lr_of_step[s] == pytest.approx(3e-3 + (s - 1 - start) / (n - start) * (3e-4 - 3e-3)), s
        assert all(lr_of_step[s] == pytest.approx(3e-3) for s in range(3, start + 1))  # stable until then
    else:
        assert result.steps == 10


def test_max_steps_caps_a_growing_schedule(tmp_path, monkeypatch):
    one_second_steps(monkeypatch)
    t = make_trainer(tmp_path, max_steps=15, max_minutes=0.5, eval_interval=4, save_interval=1000, schedule="wsd",
                     warmup_steps=2)
    assert t.step_limit == 15
    assert t.train().steps == 15


@pytest.mark.parametrize("minutes, expected", [(0.5, 37), (None, 10)])
def test_resume_keeps_the_plan_fitted_to_the_clock(tmp_path, minutes, expected):
    # A time-budgeted run's step count was fitted as it went (here, grown to 37 from a first plan of one
    # 10-step epoch); a resume goes on with that plan, not the first one. Without a time budget the
    # plan is the config's, so a resume with a new --max-steps or --epochs takes that.
    def trainer():
        return make_trainer(tmp_path, max_steps=None, epochs=1, max_minutes=minutes, schedule="wsd", warmup_steps=2,
                            batches=RandomTokens(4, 16, seed=1, batches_per_epoch=10))

    first = trainer()
    first.train_step()
    first.total_steps = 37
    first.save()
    again = trainer()
    assert again.total_steps == 10
    again.resume()
    assert again.step == 1 and again.total_steps == expected


def test_time_budget_ends_the_schedule_at_min_lr(tmp_path, monkeypatch):
    import time
    import types

    from cogni_mamba.train import trainer as trainer_module

    clock = {"now": 1000.0}

    def fake_time() -> float:  # the loop reads the wall clock once per step: one second a step
        clock["now"] += 1.0
        return clock["now"]

    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(time=fake_time, perf_counter=time.perf_counter))
    t = make_trainer(tmp_path, max_steps=500, max_minutes=0.5, eval_interval=5, save_interval=1000)
    result = t.train()
    # A 30 s budget at about one second a step: the schedule shrinks from 500 steps to about 30 and ends
    # there, at min_lr, instead of being cut off by the clock near the start of the cosine.
    assert result.stopped == "finished" and result.steps == t.total_steps and 20 <= result.steps <= 30
    lr_of_step = {m["step"]: m["lr"] for m in metrics_records(tmp_path / "run") if "lr" in m}

    def cosine(index: int, total: int) -> float:  # the closed form: warmup 3, lr 3e-3 down to 3e-4 at `total`
        return 3e-4 + 0.5 * (1 + math.cos(math.pi * (index - 3) / (total - 3))) * (3e-3 - 3e-4)

    # The schedule was last re-fitted at the last evaluation (every 5 steps); every step after it ran on
    # the cosine that ends at the final step count. Logged step s ran optimizer step s - 1 (0-based).
    last_fit = (result.steps - 1) // 5 * 5
    for s in range(last_fit + 1, result.steps + 1):
        assert lr_of_step[s] == pytest.approx(cosine(s - 1, result.steps), rel=1e-6), s
    assert lr_of_step[result.steps] < 3e-4 * 1.1  # the last step ran at (about) min_lr
