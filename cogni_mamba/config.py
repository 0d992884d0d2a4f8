"""Typed configuration: one small dataclass per concern, presets, JSON files and `--set` overrides.

Each component receives only its own section (`Trainer(..., cfg.train)`, `CogniMamba(cfg.model)`);
only the CLI sees the whole `Config`.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CogniError


class ConfigError(CogniError):
    """An invalid configuration value, unknown key or unreadable config file."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture of a CogniMamba model (Llama-style decoder)."""

    dim: int = 1024
    n_layers: int = 12
    n_heads: int = 16
    n_kv_heads: int = 4
    vocab_size: int = 50304
    hidden_dim: int | None = None  # SwiGLU width; None -> derived from ffn_multiplier as in Llama
    ffn_multiplier: float = 1.0
    multiple_of: int = 256
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "multiple_of"):
            _require(getattr(self, name) > 0, f"model.{name} must be a positive integer, got {getattr(self, name)}.")
        _require(self.hidden_dim is None or self.hidden_dim > 0,
                 f"model.hidden_dim must be positive (or null to derive it), got {self.hidden_dim}.")
        _require(self.ffn_multiplier > 0, f"model.ffn_multiplier must be positive, got {self.ffn_multiplier}.")
        _require(self.dim % self.n_heads == 0,
                 f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads}).")
        _require(self.n_heads % self.n_kv_heads == 0,
                 f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}).")
        _require(self.head_dim % 2 == 0,
                 f"model.head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings; "
                 "change model.dim or model.n_heads.")
        _require(self.rope_theta > 0, f"model.rope_theta must be positive, got {self.rope_theta}.")
        _require(self.norm_eps > 0, f"model.norm_eps must be positive, got {self.norm_eps}.")
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}.")
        _require(self.init_std > 0, f"model.init_std must be positive, got {self.init_std}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn_dim(self) -> int:
        """SwiGLU hidden width: explicit, or Llama's 2/3 * 4 * dim rounded up to `multiple_of`."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(self.ffn_multiplier * int(2 * 4 * self.dim / 3))
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the prepared token shards live and how batches are cut from them."""

    data_dirs: list[str] = field(default_factory=list)  # prepared dataset folders (train.bin, val.bin, meta.json)
    weights: list[float] = field(default_factory=list)  # mixture weights, one per data dir (empty = equal)
    seq_len: int = 512
    seed: int = 1337

    def __post_init__(self) -> None:
        _require(self.seq_len > 0, f"data.seq_len must be positive, got {self.seq_len}.")
        _require(not self.weights or len(self.weights) == len(self.data_dirs),
                 f"data.weights has {len(self.weights)} entries but data.data_dirs has {len(self.data_dirs)}; "
                 "give one weight per dataset or none.")
        _require(all(w > 0 for w in self.weights), "data.weights must all be positive.")


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
PARALLELS = ("ddp", "fsdp")  # under torchrun: whole model per rank, or sharded with FSDP2
OPTIMIZERS = ("adamw", "muon")  # muon: Muon for the hidden matrices, AdamW for embeddings and norms
SCHEDULES = ("cosine", "wsd")  # warmup + cosine, or warmup-stable-decay
TRACKERS = ("tensorboard", "wandb", "trackio")  # experiment trackers beside metrics.jsonl (optional packages)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation, precision, evaluation and checkpointing settings."""

    # what one step sees, and how long the run is
    batch_size: int = 4  # micro batch per process
    grad_accum: int = 8
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    epochs: int = 3
    max_minutes: float | None = None  # wall-clock budget for the run
    seed: int = 1337
    # optimizer and learning-rate schedule
    optimizer: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps that decays from lr to min_lr
    beta1: float = 0.9  # AdamW's (and, with Muon, the embedding's and norms')
    beta2: float = 0.95
    muon_momentum: float = 0.95
    # how the step runs
    precision: str = "auto"
    compile: bool = False
    parallel: str = "ddp"  # several processes: "ddp", or "fsdp" for a model too big for one GPU
    # evaluation, logs and checkpoints
    eval_interval: int = 200
    eval_batches: int = 20
    log_interval: int = 10
    log_to: list[str] = field(default_factory=list)  # trackers besides metrics.jsonl: tensorboard, wandb, trackio
    save_interval: int = 1000
    keep_last: int = 3
    out_dir: str = "runs/default"
    on_save_error: str = "stop"  # a failed save (disk full): "stop" the run, or "continue" and retry at the next
    max_bad_steps: int = 5  # non-finite steps in a row before rolling back to the last good checkpoint

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "epochs", "eval_interval", "eval_batches", "log_interval",
                     "save_interval", "keep_last", "max_bad_steps"):
            _require(getattr(self, name) > 0, f"train.{name} must be a positive integer, got {getattr(self, name)}.")
        _require(self.max_steps is None or self.max_steps > 0, f"train.max_steps must be positive, got {self.max_steps}.")
        _require(self.max_minutes is None or self.max_minutes > 0,
                 f"train.max_minutes must be positive, got {self.max_minutes}.")
        _require(self.lr > 0, f"train.lr must be positive, got {self.lr}.")
        _require(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, train.lr], got {self.min_lr}.")
        _require(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}.")
        _require(self.optimizer in OPTIMIZERS,
                 f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}.")
        _require(self.schedule in SCHEDULES,
                 f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}.")
        _require(0 < self.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}.")
        _require(0 <= self.muon_momentum < 1, f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}.")
        _require(self.on_save_error in ("stop", "continue"),
                 f"train.on_save_error must be stop or continue, got {self.on_save_error!r}.")
        unknown = [t for t in self.log_to if t not in TRACKERS]
        _require(not unknown, f"train.log_to names an unknown tracker {unknown[0] if unknown else ''!r}; choose from: {', '.join(TRACKERS)}.")
        _require(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}.")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1).")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}.")
        _require(self.precision in PRECISIONS,
                 f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}.")
        _require(self.parallel in PARALLELS,
                 f"train.parallel must be one of {', '.join(PARALLELS)}, got {self.parallel!r}.")
        _require(not (self.parallel == "fsdp" and self.precision == "fp16"),
                 "train.parallel=fsdp does not support fp16 (its loss scaler is per rank); use bf16 or fp32.")


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """Default sampling settings for generate, chat and serve."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = 0.95
    min_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _require(self.max_new_tokens > 0, f"generation.max_new_tokens must be positive, got {self.max_new_tokens}.")
        _require(self.temperature >= 0, f"generation.temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        _require(self.top_k is None or self.top_k > 0, f"generation.top_k must be positive, got {self.top_k}.")
        _require(self.top_p is None or 0 < self.top_p <= 1, f"generation.top_p must be in (0, 1], got {self.top_p}.")
        _require(self.min_p is None or 0 <= self.min_p <= 1, f"generation.min_p must be in [0, 1], got {self.min_p}.")
        _require(self.repetition_penalty > 0,
                 f"generation.repetition_penalty must be positive, got {self.repetition_penalty}.")


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration, as stored in config.json and beside every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    preset: str | None = None
    tokenizer: str | None = None  # tokenizer directory or hub name ("gpt2")


# --- presets ------------------------------------------------------------------------------------

def _preset_nano() -> Config:
    # ~4M parameters with a 4,096-token BPE vocabulary: trains at thousands of tokens/s on 2 CPU cores.
    return Config(
        preset="nano",
        model=ModelConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=4096, hidden_dim=768,
                          max_seq_len=256),
        data=DataConfig(seq_len=256),
        # Muon + warmup-stable-decay at 4e-3: on held-out TinyStories it reached AdamW + cosine's (2e-3) final
        # loss with 60% of the tokens and ended 10% lower in bits per byte (benchmarks/RESULTS.md, recipe.py).
        train=TrainConfig(batch_size=16, grad_accum=1, optimizer="muon", schedule="wsd", lr=4e-3, min_lr=4e-4,
                          warmup_steps=30, weight_decay=0.1, eval_interval=50, eval_batches=8, save_interval=200,
                          out_dir="runs/nano"),
    )


def _gpt2_sized(name: str, dim: int, n_layers: int, *, lr: float) -> Config:
    return Config(
        preset=name,
        model=ModelConfig(dim=dim, n_layers=n_layers, n_heads=16, n_kv_heads=4, vocab_size=50304, max_seq_len=1024),
        # Muon's update is scaled to AdamW's size (match_rms_adamw), so these presets keep their AdamW learning
        # rates; only nano's was swept (benchmarks/recipe.py).
        train=TrainConfig(optimizer="muon", schedule="wsd", lr=lr, min_lr=round(lr / 10, 12), out_dir=f"runs/{name}"),
        tokenizer="gpt2",
    )


PRESETS: dict[str, typing.Callable[[], Config]] = {
    "nano": _preset_nano,
    "tiny": lambda: _gpt2_sized("tiny", 768, 6, lr=6e-4),
    "small": lambda: _gpt2_sized("small", 896, 8, lr=5e-4),
    "medium": lambda: _gpt2_sized("medium", 1024, 12, lr=3e-4),
    "large": lambda: _gpt2_sized("large", 1280, 16, lr=2.5e-4),
}
DEFAULT_PRESET = "medium"


def preset(name: str) -> Config:
    """The named preset as a full Config."""
    if name not in PRESETS:
        raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]()


# --- dict / JSON conversion ---------------------------------------------------------------------

def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a JSON or CLI value against a dataclass field's type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}.")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}.")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {value!r}.")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where} must be true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be an integer, got {value!r}.")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} must be a number, got {value!r}.")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be a number, got {value!r}.")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}.")
    raise ConfigError(f"{where}: unsupported field type {tp!r}.")  # pragma: no cover - programming error


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"Unknown config key {prefix}{unknown[0]}; valid keys{' in ' + where if where else ''} are: "
                          f"{', '.join(names)}.")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from a (possibly partial) dict; missing keys keep `base`'s (or the preset's) values."""
    if not isinstance(data, dict):
        raise ConfigError("A config must be a JSON object with sections like \"model\" and \"train\".")
    if base is None:
        base = preset(data["preset"]) if isinstance(data.get("preset"), str) else Config()
    merged = _deep_merge(to_dict(base), data)
    return _from_dict(Config, merged, "")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, base: Config | None = None) -> Config:
    """Read a config.json (the whole file or only the keys that differ from its preset)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; pass --config with the path of a config.json.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"Config file {path} is not valid JSON ({e}); fix the file or regenerate it.") from None
    return from_dict(data, base)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the whole config as indented JSON (atomically: a reader never sees half a file)."""
    from .files import write_text_atomically

    write_text_atomically(path, json.dumps(to_dict(cfg), indent=2) + "\n")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.field=value` strings, each parsed against that field's type."""
    update: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like section.field=value (e.g. train.lr=3e-4).")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        value: Any = None if raw.strip().lower() in ("none", "null") else raw.strip()
        node = update
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return from_dict(update, cfg) if update else cfg


def replace(cfg: Any, **changes: Any) -> Any:
    """A copy of a frozen config with some fields changed (validated again)."""
    return dataclasses.replace(cfg, **changes)
