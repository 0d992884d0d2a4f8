"""The optimizers and schedules against references written here: a plain Newton-Schulz Muon step, a
plain AdamW step, and the warmup-stable-decay curve from its closed form."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from cogni_mamba.config import ConfigError, TrainConfig, preset
from cogni_mamba.model import CogniMamba
from cogni_mamba.train.optim import MuonAdamW, build_optimizer, lr_at

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")


def small_model(seed: int = 0) -> CogniMamba:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(preset("nano").model, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                              hidden_dim=96, max_seq_len=32)
    return CogniMamba(cfg)


def muon_train_cfg(**changes) -> TrainConfig:
    return TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.1, muon_momentum=0.9, **changes)


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz orthogonalisation of Muon, in float64, step by step."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def backward(model: CogniMamba, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 128, (2, 16), generator=g)
    _, loss = model(x, x)
    loss.backward()


def test_parameters_split_between_muon_and_adamw():
    model = small_model()
    opt = build_optimizer(model, muon_train_cfg(), "cpu")
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt._muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt._adamw.param_groups for p in g["params"]}
    expected_muon = {f"layers.{i}.{w}.weight" for i in range(2) for w in
                     ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                      "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert muon == expected_muon
    assert adamw == {"tok_embeddings.weight", "norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2)
                                                                 for n in ("attention_norm", "ffn_norm")}
    assert len(opt.param_groups) == 3  # one Muon group, decayed and undecayed AdamW groups


def test_two_muon_steps_equal_plain_newton_schulz_reference():
    cfg = muon_train_cfg()
    model = small_model()
    opt = build_optimizer(model, cfg, "cpu")
    name = "layers.1.feed_forward.w1.weight"  # (96, 64): a tall matrix, transposed inside the iteration
    p = dict(model.named_parameters())[name]
    momentum = torch.zeros_like(p, dtype=torch.float64)
    for step in range(2):
        opt.zero_grad()
        backward(model, seed=step)
        before, grad = p.detach().double().clone(), p.grad.double().clone()
        opt.step()
        momentum = cfg.muon_momentum * momentum + (1 - cfg.muon_momentum) * grad
        nesterov = (1 - cfg.muon_momentum) * grad + cfg.muon_momentum * momentum
        update = newton_schulz(nesterov)
        scale = 0.2 * math.sqrt(max(p.shape))  # Muon's update matched to AdamW's RMS
        expected = before * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * scale * update
        # Muon runs the iteration in bfloat16, which does not converge to a fixed point, so single entries
        # move by up to ~15% (measured): compare the update's direction and size, not entry by entry.
        applied, reference = before - p.detach().double(), before - expected
        assert torch.nn.functional.cosine_similarity(applied.flatten(), reference.flatten(), dim=0) > 0.98
        assert applied.norm() / reference.norm() == pytest.approx(1.0, abs=0.03)


def test_embedding_step_equals_plain_adamw_reference():
    cfg = muon_train_cfg(beta1=0.9, beta2=0.95)
    model = small_model()
    opt = build_optimizer(model, cfg, "cpu")
    p = model.tok_embeddings.weight
    m = torch.zeros_like(p, dtype=torch.float64)
    v = torch.zeros_like(p, dtype=torch.float64)
    for t in range(1, 4):
        opt.zero_grad()
        backward(model, seed=t)
        before, g = p.detach().double().clone(), p.grad.double().clone()
        opt.step()
        m = cfg.beta1 * m + (1 - cfg.beta1) * g
        v = cfg.beta2 * v + (1 - cfg.beta2) * g * g
        m_hat, v_hat = m / (1 - cfg.beta1 ** t), v / (1 - cfg.beta2 ** t)
        expected = before * (1 - cfg.lr * cfg.weight_decay) - cfg.lr * m_hat / (v_hat.sqrt() + 1e-8)
        assert torch.allclose(p.detach().double(), expected, atol=1e-6)


def test_state_dict_round_trip_continues_identically():
    cfg = muon_train_cfg()
    a, b = small_model(), small_model()
    opt_a, opt_b = build_optimizer(a, cfg, "cpu"), build_optimizer(b, cfg, "cpu")
    for step in range(2):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            backward(model, step)
            opt.step()
    saved = copy.deepcopy(opt_b.state_dict())
    opt_b = build_optimizer(b, cfg, "cpu")  # a fresh optimizer, as after a restart
    opt_b.load_state_dict(saved)
    for group in opt_b.param_groups:
        group["lr"] = 0.01  # the schedule writes the outer groups; the inner optimizers must see it
    for group in opt_a.param_groups:
        group["lr"] = 0.01
    for step in range(2, 4):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            backward(model, step)
            opt.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name


@pytest.mark.parametrize(("step", "expected"), [
    (0, 1e-3 / 10), (9, 1e-3),                     # warmup: lr * (step + 1) / 10
    (10, 1e-3), (79, 1e-3),                        # stable until the last 20 of 100 steps
    (80, 1e-3), (90, (1e-3 + 1e-4) / 2),           # linear decay over steps 80..100
    (95, 1e-3 - 0.75 * (1e-3 - 1e-4)), (100, 1e-4), (150, 1e-4),
])
def test_wsd_schedule_matches_closed_form(step, expected):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_at(step, cfg, 100) == pytest.approx(expected)
    assert lr_at(step, cfg, 100, scale=0.5) == pytest.approx(expected / 2)


@pytest.mark.parametrize(("change", "field"), [
    ({"optimizer": "sgd"}, "train.optimizer"), ({"schedule": "linear"}, "train.schedule"),
    ({"decay_fraction": 0.0}, "train.decay_fraction"), ({"muon_momentum": 1.0}, "train.muon_momentum"),
])
def test_bad_optimizer_settings_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**change)
