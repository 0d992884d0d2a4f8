"""Import a local Hugging Face Llama checkpoint (config.json + safetensors + tokenizer.json) as a CogniMamba.

Only what our model computes exactly is accepted: SiLU SwiGLU, RMSNorm, no biases, plain rotary
embeddings (no rope_scaling) and head_dim = hidden_size / num_attention_heads. Anything else is refused
with a sentence that names the difference, rather than imported into a model that computes something else.
Weights are converted to float32 (our training precision keeps float32 master weights).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..config import Config, ConfigError, ModelConfig
from ..model import CogniMamba
from .common import ExportError
from .hf import key_map

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved; recomputed by our model


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    """config.json of a Hugging Face model folder, or an ExportError saying what is missing."""
    if not hf_dir.is_dir():
        raise ExportError(f"{hf_dir} is not a folder; pass --hf with a local Hugging Face model folder.")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"{hf_dir} has no config.json, so it is not a Hugging Face model folder.")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not valid JSON ({e}); replace it with the model's original config.json.") \
            from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{path} is not a JSON object; replace it with the model's original config.json.")
    return cfg


def rope_theta_of(cfg: dict[str, Any]) -> float:
    """The rotary base, refusing any rope scaling (transformers 4 `rope_scaling`, 5 `rope_parameters`)."""
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters") or {}
    for where, spec in (("rope_scaling", scaling), ("rope_parameters", params)):
        kind = (spec or {}).get("rope_type", (spec or {}).get("type", "default"))
        if kind != "default":
            raise ExportError(f"The checkpoint uses {where} of type {kind!r}; CogniMamba implements only plain "
                              "rotary embeddings, so it cannot be imported.")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def check_compatible(cfg: dict[str, Any]) -> None:
    """Raise an ExportError naming the first setting our model cannot reproduce exactly."""
    model_type = cfg.get("model_type")
    if model_type != "llama":
        raise ExportError(f"The checkpoint is a {model_type!r} model; only Llama checkpoints (model_type "
                          "'llama') can be imported.")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"The checkpoint uses hidden_act {cfg['hidden_act']!r}; CogniMamba's feed-forward is "
                          "SiLU SwiGLU, so it cannot be imported.")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag, False):
            raise ExportError(f"The checkpoint has {flag} = true; CogniMamba's layers have no biases, so it "
                              "cannot be imported.")
    if int(cfg.get("pretraining_tp", 1) or 1) != 1:
        raise ExportError("The checkpoint sets pretraining_tp != 1, which changes how HF computes it; "
                          "re-save it with pretraining_tp = 1 first.")
    heads, dim = cfg.get("num_attention_heads"), cfg.get("hidden_size")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and heads and dim and head_dim * heads != dim:
        raise ExportError(f"The checkpoint has head_dim {head_dim} but hidden_size / num_attention_heads = "
                          f"{dim / heads:g}; CogniMamba derives head_dim from those, so it cannot be imported.")
    rope_theta_of(cfg)


def model_config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a compatible LlamaConfig dict."""
    check_compatible(cfg)
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelConfig(
            dim=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads), vocab_size=int(cfg["vocab_size"]),
            hidden_dim=int(cfg["intermediate_size"]), max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta_of(cfg), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            init_std=float(cfg.get("initializer_range", 0.02)),
        )
    except KeyError as e:
        raise ExportError(f"The checkpoint's config.json lacks {e.args[0]!r}; it is not a complete Llama config.") \
            from None
    except ConfigError as e:
        raise ExportError(f"The checkpoint's shape is not one CogniMamba supports: {e}") from None


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{index} is unreadable ({e}); replace it with the model's original index.") from None
        files = [hf_dir / s for s in shards]
    else:
        hint = (" (it has only pickled .bin weights, which are never unpickled here: convert them to "
                "safetensors first)") if any(hf_dir.glob("*.bin")) else ""
        raise ExportError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json{hint}.")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors |= load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"Cannot read {f} ({e}); the download may be incomplete.") from None
    return tensors


def our_state_dict(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors renamed to ours (float32), insisting that the sets of names and the shapes match."""
    weights = {k: v for k, v in weights.items() if not k.endswith(IGNORED_SUFFIXES)}
    names = key_map(config)
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    wanted = set(names.values())
    missing = sorted(wanted - set(weights))
    extra = sorted(set(weights) - wanted)
    if missing:
        raise ExportError(f"The checkpoint lacks tensor {missing[0]}; its weights do not match its config.json.")
    if extra:
        raise ExportError(f"The checkpoint has tensor {extra[0]}, which CogniMamba has no place for (a bias or "
                          "another architecture); it cannot be imported.")
    return {ours: weights[theirs].to(torch.float32) for ours, theirs in names.items()}


def grow_vocab(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Embedding (and untied head) rows added up to vocab_size, each the mean of the existing rows.

    Needed when the tokenizer gains CogniMamba's special tokens (chat roles, pad) beyond the model's
    vocabulary; the mean row gives the new tokens a neutral start until they are fine-tuned.
    """
    out = dict(state)
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in out:
            w = out[name]  # (V, dim)
            extra = w.mean(dim=0, keepdim=True).expand(vocab_size - w.shape[0], -1)
            out[name] = torch.cat([w, extra], dim=0)  # (vocab_size, dim)
    return out


def import_hf(hf_dir: str | Path, tokenizer=None) -> tuple[CogniMamba, Any, Config]:
    """(model, tokenizer, Config) from a local HF Llama folder; the tokenizer defaults to its tokenizer.json.

    Our Tokenizer adds CogniMamba's special tokens where the tokenizer lacks them; when that needs more
    rows than the model has, the vocabulary grows (see `grow_vocab`).
    """
    from ..tokenizer import load_tokenizer

    hf_dir = Path(hf_dir)
    model_cfg = model_config_from_hf(read_hf_config(hf_dir))
    state = our_state_dict(read_hf_weights(hf_dir), model_cfg)
    if tokenizer is None:
        if not (hf_dir / "tokenizer.json").is_file():
            raise ExportError(f"{hf_dir} has no tokenizer.json (a fast tokenizer); pass --tokenizer with a "
                              "byte-level BPE tokenizer folder for this model.")
        tokenizer = load_tokenizer(hf_dir / "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        state = grow_vocab(state, tokenizer.vocab_size)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    model = CogniMamba(model_cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "output.weight" for k in missing), (missing, unexpected)
    model.eval()
    config = Config(model=model_cfg)
    return model, tokenizer, config


def import_to_checkpoint(hf_dir: str | Path, out_dir: str | Path, *, tokenizer=None, force: bool = False) -> Path:
    """Convert a HF Llama folder into a CogniMamba checkpoint directory at out_dir (written atomically)."""
    from ..train.checkpoint import save_checkpoint
    from .common import check_target

    out = Path(out_dir)
    check_target(out, force)
    model, tok, config = import_hf(hf_dir, tokenizer)
    info = {"imported_from": str(Path(hf_dir).resolve())}
    return save_checkpoint(out.parent, out.name, model, config, tokenizer=tok, info=info, update_latest=False)
