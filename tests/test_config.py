"""Config: JSON round trip, typed overrides, and one clear error per kind of bad value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cogni_mamba.config import (
    PRESETS,
    Config,
    ConfigError,
    ModelConfig,
    apply_overrides,
    from_dict,
    load_config,
    preset,
    save_config,
    to_dict,
)
from tests.conftest import REPO


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(preset("small"), ["train.lr=1e-3", "data.data_dirs=a,b", "model.hidden_dim=1000"])
    save_config(cfg, tmp_path / "c.json")
    again = load_config(tmp_path / "c.json")
    assert again == cfg
    assert json.loads((tmp_path / "c.json").read_text())["model"]["hidden_dim"] == 1000


def test_partial_file_keeps_preset_values(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"preset": "nano", "train": {"lr": 0.01}}))
    cfg = load_config(tmp_path / "c.json")
    assert cfg.train.lr == 0.01 and cfg.model.dim == preset("nano").model.dim


def test_info_save_config_writes_the_repo_config_json(tmp_path):
    out = _cli("info", "--preset", "medium", "--save-config", str(tmp_path / "config.json"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "config.json").read_text() == (REPO / "config.json").read_text()  # the command made it


def test_repo_config_json_is_the_default_medium():
    cfg = load_config(REPO / "config.json")
    assert cfg == preset("medium")  # every section, so a stale file (a missing field) fails here
    assert json.loads((REPO / "config.json").read_text()) == to_dict(preset("medium"))


def test_overrides_are_parsed_against_field_types():
    cfg = apply_overrides(Config(), ["train.batch_size=8", "train.compile=true", "generation.top_k=none",
                                     "model.rope_theta=500000", "train.max_steps=1_000"])
    assert cfg.train.batch_size == 8 and cfg.train.compile is True and cfg.generation.top_k is None
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.train.max_steps == 1000


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=eight", "train.batch_size must be an integer"),
    ("train.compile=maybe", "train.compile must be true or false"),
    ("train.lrr=1", "Unknown config key train.lrr; valid keys in train are: batch_size"),
    ("modle.dim=3", "Unknown config key modle; valid keys are: model, data"),
    ("train.lr", "must look like section.field=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        apply_overrides(Config(), [override])


@pytest.mark.parametrize("changes, field", [
    (dict(dim=100, n_heads=16), "model.dim (100) must be divisible by model.n_heads (16)"),
    (dict(n_heads=16, n_kv_heads=3), "model.n_heads (16) must be divisible by model.n_kv_heads (3)"),
    (dict(dim=48, n_heads=16, n_kv_heads=4), "model.head_dim = dim / n_heads = 3 must be even"),
    (dict(n_layers=0), "model.n_layers must be a positive integer"),
    (dict(vocab_size=-5), "model.vocab_size must be a positive integer"),
    (dict(dropout=1.5), "model.dropout must be in [0, 1)"),
])
def test_each_bad_model_config_names_its_field(changes, field):
    with pytest.raises(ConfigError) as e:
        ModelConfig(**changes)
    assert str(e.value).startswith(field)


def test_bad_train_and_generation_values():
    with pytest.raises(ConfigError, match="train.precision must be one of auto, bf16, fp16, fp32"):
        from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(ConfigError, match=r"generation.top_p must be in \(0, 1\]"):
        from_dict({"generation": {"top_p": 1.5}})
    with pytest.raises(ConfigError, match="train.min_lr must be in"):
        from_dict({"train": {"lr": 1e-4, "min_lr": 1e-3}})


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_survives_a_json_round_trip(name):
    cfg = preset(name)
    back = from_dict(json.loads(json.dumps(to_dict(cfg))), Config())
    assert back == cfg


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "cogni_mamba", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_info_medium_prints_true_count_and_memory_table():
    out = _cli("info", "--preset", "medium")
    assert out.returncode == 0, out.stderr
    assert "186,803,200" in out.stdout
    for row in ("weights", "gradients", "optimizer", "activations", "KV cache"):
        assert row in out.stdout


def test_cli_check_exits_zero_on_cpu():
    out = _cli("check", "--preset", "nano")
    assert out.returncode == 0, out.stderr
    assert "check passed" in out.stdout and "device: cpu" in out.stdout


def test_cli_bad_override_is_one_sentence_no_traceback():
    out = _cli("info", "--set", "model.n_kv_heads=3")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: model.n_heads (16) must be divisible by model.n_kv_heads (3)")
