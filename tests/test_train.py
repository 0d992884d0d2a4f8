"""Trainer unit tests: tiny models on CPU, each checked against a reference computed here."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parent))

from train_worker import VOCAB, RandomTokens, tiny_model_config  # noqa: E402

from cogni_mamba.config import TrainConfig, preset  # noqa: E402
from cogni_mamba.errors import CogniError  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402
from cogni_mamba.train import checkpoint as ckpt  # noqa: E402
from cogni_mamba.train.optim import lr_at, param_groups  # noqa: E402
from cogni_mamba.train.precision import resolve_precision  # noqa: E402
from cogni_mamba.train.trainer import Trainer  # noqa: E402


def make_trainer(tmp_path, *, model=None, batches=None, val=None, **overrides) -> Trainer:
    torch.manual_seed(0)
    model = model or CogniMamba(tiny_model_config())
    fields = dict(batch_size=4, grad_accum=1, max_steps=20, lr=3e-3, min_lr=3e-4, warmup_steps=3, eval_interval=10,
                  save_interval=10, precision="fp32", out_dir=str(tmp_path / "run"))
    fields.update(overrides)
    cfg = TrainConfig(**fields)
    batches = batches if batches is not None else RandomTokens(cfg.batch_size, 16, seed=1)
    return Trainer(model, batches, val, cfg, device="cpu", progress=False, log=lambda m: None)


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- optimisation -------------------------------------------------------------------------------

@pytest.mark.slow  # the real nano preset (4M parameters): tens of seconds on 2 busy cores
def test_nano_model_overfits_one_batch(tmp_path):
    cfg = preset("nano")
    torch.manual_seed(0)
    model = CogniMamba(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 33))
    batch = (x[:, :-1], x[:, 1:])
    trainer = make_trainer(tmp_path, model=model, batches=[batch], batch_size=2, max_steps=60, lr=3e-3,
                           min_lr=3e-3, warmup_steps=5, weight_decay=0.0, eval_interval=1000, save_interval=1000)
    losses = []
    while len(losses) < 60 and (not losses or losses[-1] >= 0.1):
        losses.append(trainer.train_step().loss)
    assert losses[0] > math.log(cfg.model.vocab_size) - 1  # starts near chance
    assert losses[-1] < 0.1, losses[-5:]


def test_accumulation_equals_one_big_batch(tmp_path):
    k, b = 4, 2
    trainer = make_trainer(tmp_path, batch_size=b, grad_accum=k, grad_clip=0.05)
    reference = copy.deepcopy(trainer.raw_model)
    micro = [next(trainer.train_batches) for _ in range(k)]
    big_x, big_y = torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro])

    trainer.forward_backward(micro)
    _, loss = reference(big_x, big_y)
    loss.backward()
    for (name, p), q in zip(trainer.raw_model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_step_reports_preclip_norm_and_clips(tmp_path):
    trainer = make_trainer(tmp_path, grad_clip=0.05, weight_decay=0.1, warmup_steps=1)
    reference = copy.deepcopy(trainer.raw_model)
    x, y = next(copy.deepcopy(trainer.train_batches))
    out = trainer.train_step()

    # Reference: plain autograd, norm by hand, clip by hand, AdamW with hand-made groups.
    _, loss = reference(x, y)
    loss.backward()
    grads = [p.grad for p in reference.parameters()]
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
    assert out.loss == pytest.approx(loss.item(), rel=1e-6)
    assert out.grad_norm == pytest.approx(norm, rel=1e-5)
    assert norm > 0.05
    for g in grads:
        g.mul_(0.05 / norm)
    decay = [p for p in reference.parameters() if p.dim() >= 2]
    no_decay = [p for p in reference.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=trainer.cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    opt.step()
    for (name, p), q in zip(trainer.raw_model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_lr_schedule_matches_formula():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    total = 110
    assert lr_at(0, cfg, total) == pytest.approx(1e-3 / 10)
    assert lr_at(4, cfg, total) == pytest.approx(1e-3 * 5 / 10)
    assert lr_at(9, cfg, total) == pytest.approx(1e-3)
    assert lr_at(10, cfg, total) == pytest.approx(1e-3)  # cosine starts at its top
    assert lr_at(60, cfg, total) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway: cos(pi/2) = 0
    quarter = 1e-4 + 0.5 * (1 + math.cos(math.pi * 0.25)) * 9e-4
    assert lr_at(35, cfg, total) == pytest.approx(quarter)
    assert lr_at(110, cfg, total) == pytest.approx(1e-4)
    assert lr_at(500, cfg, total) == pytest.approx(1e-4)
    assert lr_at(60, cfg, total, scale=0.5) == pytest.approx((1e-3 + 1e-4) / 4)


def test_optimizer_uses_scheduled_lr_each_step(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=12, warmup_steps=4, lr=2e-3, min_lr=2e-4)
    seen = []
    for _ in range(12):
        trainer.train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    for s, lr in enumerate(seen):
        expected = 2e-3 * (s + 1) / 4 if s < 4 else 2e-4 + 0.5 * (1 + math.cos(math.pi * (s - 4) / 8)) * 1.8e-3
        assert lr == pytest.approx(expected), s


def test_weight_decay_only_on_matrices():
    cfg = tiny_model_config()
    model = CogniMamba(cfg)
    decayed, plain = param_groups(model, 0.1)
    n_decay = sum(p.numel() for p in decayed["params"])
    n_plain = sum(p.numel() for p in plain["params"])
    # Closed form: norms are 2 per layer + the final one, each `dim` wide; everything else is a matrix.
    attn = cfg.dim * cfg.dim * 2 + cfg.dim * cfg.kv_dim * 2
    ffn = 3 * cfg.dim * cfg.ffn_dim
    assert n_plain == (2 * cfg.n_layers + 1) * cfg.dim
    assert n_decay == cfg.vocab_size * cfg.dim + cfg.n_layers * (attn + ffn)  # tied head counted once
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0


# --- precision ----------------------------------------------------------------------------------

def test_precision_resolution_on_cpu():
    cpu = torch.device("cpu")
    expected = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(CogniError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)


def test_bf16_autocast_step_trains(tmp_path):
    trainer = make_trainer(tmp_path, precision="bf16")
    assert trainer.precision == "bf16"
    before = params(trainer.raw_model)
    out = trainer.train_step()
    assert out.applied and math.isfinite(out.loss)
    assert trainer.raw_model.tok_embeddings.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(before["layers.0.attention.wq.weight"], trainer.raw_model.layers[0].attention.wq.weight)


# --- faults -------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["loss", "grad"])
def test_nonfinite_step_leaves_weights_and_optimizer_unchanged(tmp_path, where):
    trainer = make_trainer(tmp_path)
    trainer.train_step()  # give the optimizer some state
    weights = params(trainer.raw_model)
    opt_state = copy.deepcopy(trainer.optimizer.state_dict())
    model = trainer.raw_model
    if where == "loss":
        handle = model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))
    else:
        handle = model.layers[0].attention.wq.weight.register_hook(lambda g: g * float("nan"))
    out = trainer._guarded_step()
    handle.remove()

    assert not out.applied and out.reason == f"nonfinite_{where}"
    assert trainer.step == 1 and trainer.bad_steps == 1
    for k, v in params(trainer.raw_model).items():
        assert torch.equal(v, weights[k]), k
    after = trainer.optimizer.state_dict()
    for i, s in opt_state["state"].items():
        for key, t in s.items():
            assert torch.equal(after["state"][i][key], t)
    assert all(p.grad is None for p in model.parameters())  # nothing leaks into the next step
    assert trainer.train_step().applied  # and training goes on


def test_repeated_nonfinite_steps_roll_back_then_stop(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=40, max_bad_steps=2, save_interval=5, eval_interval=100)
    for _ in range(5):
        trainer.train_step()
    trainer.save()
    good = params(trainer.raw_model)
    for _ in range(3):
        trainer.train_step()
    trainer.raw_model.norm.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(CogniError, match="diverged"):
        trainer.train()
    assert trainer.rollbacks == 2 and trainer.lr_scale == 0.25
    assert trainer.step == 5  # rolled back to the checkpoint
    for k, v in params(trainer.raw_model).items():
        assert torch.equal(v, good[k]), k


# --- checkpoints --------------------------------------------------------------------------------

def test_checkpoint_round_trip_for_inference(tmp_path):
    from cogni_mamba import load_checkpoint
    from cogni_mamba.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    torch.manual_seed(0)
    model = CogniMamba(tiny_model_config().__class__(**{**tiny_model_config().__dict__, "vocab_size": tok.vocab_size}))
    trainer = make_trainer(tmp_path, model=model, batches=RandomTokens(4, 16, seed=3))
    trainer.tokenizer = tok
    for _ in range(3):
        trainer.train_step()
    path = trainer.save()
    assert (tmp_path / "run" / "latest").read_text().strip() == path.name == "step-3"

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict()) - {"output.weight"}  # tied head stored once, no prefixes

    loaded, loaded_tok = load_checkpoint(tmp_path / "run")
    assert loaded_tok.fingerprint == tok.fingerprint
    x = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()  # still tied


def test_wrapper_prefixes_never_reach_the_weights():
    model = CogniMamba(tiny_model_config())
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    tensors, aliases = ckpt.weights_for_saving(compiled)
    assert set(tensors) == set(model.state_dict()) - {"output.weight"}
    assert aliases == {"output.weight": "tok_embeddings.weight"}


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    from cogni_mamba import load_checkpoint

    with pytest.raises(CogniError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CogniError, match="No complete checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_interrupted_save_is_never_chosen(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    trainer.save()
    good = params(trainer.raw_model)
    run = tmp_path / "run"

    # A kill in the middle of writing step-2: torch.save of the train state never returns.
    trainer.train_step()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert not (run / "step-2").exists()
    assert (run / "latest").read_text().strip() == "step-1"

    # What a kill can leave on disk, plus a foreign half-copied dir with a newer step and a pointer to it.
    partial = run / ".tmp-step-3-deadbeef"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    half = run / "step-4"
    half.mkdir()
    (half / "model.safetensors").write_bytes((run / "step-1" / "model.safetensors").read_bytes()[:100])
    (half / "config.json").write_text("{}")
    assert ckpt.find_checkpoint(run) == run / "step-1"
    (run / "latest").write_text("step-4\n")
    assert ckpt.find_checkpoint(run) == run / "step-1"
    with pytest.raises(CogniError, match="incomplete"):
        ckpt.find_checkpoint(half)
    model, _ = ckpt.load_checkpoint(run)
    for k, v in model.state_dict().items():
        assert torch.equal(v, good[k]), k


class _Payload:
    """Unpickling this runs code that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_malicious_train_state_is_refused_without_running(tmp_path, monkeypatch):
    # Control: the payload is live when unpickled the unsafe way.
    control = tmp_path / "control-marker"
    torch.save({"step": _Payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    trainer = make_trainer(tmp_path)
    trainer.train_step()
    path = trainer.save()
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "optimizer": _Payload(marker)}, path / "train_state.pt")
    fresh = make_trainer(tmp_path)
    with pytest.raises(CogniError, match="train_state.pt does not match the checksum"):
        fresh.resume()  # the replaced file no longer matches complete.json
    assert not marker.exists()
    monkeypatch.setenv("COGNI_MAMBA_NO_VERIFY", "1")  # even unchecked, the pickle never runs
    with pytest.raises(CogniError, match="Refusing"):
        fresh.resume()
    assert not marker.exists()


def test_epoch_best_and_keep_last(tmp_path):
    val = [next(RandomTokens(4, 16, seed=50))]
    trainer = make_trainer(tmp_path, batches=RandomTokens(4, 16, seed=1, batches_per_epoch=6), val=val,
                           max_steps=None, epochs=2, save_interval=2, eval_interval=4, keep_last=2)
    assert trainer.total_steps == 12
    result = trainer.train()
    run = tmp_path / "run"
    assert result.steps == 12 and result.stopped == "finished"
    names = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))
    assert names == ["best", "epoch-1", "epoch-2", "latest", "loss.png", "metrics.jsonl", "step-10", "step-12"]
    records = trainer.metrics.read()
    vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    assert [s for s, _ in vals] == [4, 6, 8, 12]  # every eval_interval and at each epoch end
    best_step, best = min(vals, key=lambda sv: sv[1])
    assert ckpt._marker_step(run / "best") == best_step and result.best_val_loss == best
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the command --------------------------------------------------------------------------------

def test_cli_trains_on_prepared_data_and_resumes(tmp_path, capsys):
    from cogni_mamba import load_checkpoint
    from cogni_mamba.cli import main
    from cogni_mamba.data import prepare
    from cogni_mamba.tokenizer import SimpleTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"Story {i}: the cat number {i} sat on the mat and purred. " * 8)
    prepare([str(corpus)], SimpleTokenizer(), tmp_path / "data", val_fraction=0.1, seed=0, progress=False)
    tiny = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=4", "--set",
            "model.n_kv_heads=2", "--set", "model.hidden_dim=64", "--set", "data.seq_len=32", "--set",
            "train.batch_size=4", "--set", "train.eval_interval=3", "--set", "train.save_interval=3",
            "--set", "train.eval_batches=2"]
    run = tmp_path / "run"
    base = ["train", "--preset", "nano", "--data", str(tmp_path / "data"), "--out", str(run), "--quiet",
            "--precision", "fp32"]
    assert main([*base, "--tokenizer", "simple", "--max-steps", "6", *tiny]) == 0
    assert (run / "latest").read_text().strip() == "step-6"
    assert main([*base, "--max-steps", "9", "--resume"]) == 0  # config and tokenizer come from the run
    out = capsys.readouterr().out
    assert "resumed from" in out and "finished: 9 steps" in out
    steps = [r["step"] for r in metrics_records(run) if "loss" in r]
    assert steps == list(range(1, 10))
    model, tok = load_checkpoint(run)
    assert tok.fingerprint == SimpleTokenizer().fingerprint and model.config.dim == 32

    assert main(["train", "--preset", "nano", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "No training data given" in capsys.readouterr().err


def metrics_records(run: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- construction ---------------------------------------------------------------------------------

def test_build_trainer_removes_stale_temps_and_the_trainer_itself_touches_nothing(tmp_path):
    from cogni_mamba.train import build_trainer

    stale = tmp_path / "run" / ".tmp-step-3"
    stale.mkdir(parents=True)
    make_trainer(tmp_path)
    assert stale.is_dir()
    cfg = TrainConfig(batch_size=4, max_steps=2, precision="fp32", out_dir=str(tmp_path / "run"))
    trainer = build_trainer(CogniMamba(tiny_model_config()), RandomTokens(4, 16, seed=1), None, cfg, device="cpu",
                            progress=False, log=lambda m: None)
    assert not stale.exists() and trainer.model is trainer.raw_model  # no process group, no compile: no wrapper


def test_a_trainer_refuses_a_model_that_is_not_on_its_device(tmp_path):
    with torch.device("meta"):
        model = CogniMamba(tiny_model_config())
    with pytest.raises(ValueError, match="build_trainer"):
        make_trainer(tmp_path, model=model)
