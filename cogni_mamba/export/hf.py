"""Export to a Hugging Face Llama folder that `AutoModelForCausalLM` / `AutoTokenizer` load offline.

The folder holds config.json (LlamaConfig), model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json (PreTrainedTokenizerFast, our special tokens, the chat template as Jinja) and
special_tokens_map.json. Our rotary embedding already uses HF's half-split layout, so the weights are a
plain rename. The model's vocabulary is padded to a multiple of 64, so config.json's `vocab_size` is the
padded size while the tokenizer holds only the real tokens; HF accepts that (the extra rows are never
produced by the tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import unwrap
from ..config import Config, ModelConfig
from ..files import write_dir_atomically
from ..tokenizer.specials import END_TOKEN, EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS
from .common import ExportError, chat_template_jinja, check_target

# Our parameter name -> HF's, per layer ({i} is the layer index) and for the rest of the model.
LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
TOP_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def hf_key(name: str) -> str:
    """HF Llama's name of one of our parameters ("layers.3.attention.wq.weight" -> "model.layers.3.self_attn...")."""
    if name in TOP_KEYS:
        return TOP_KEYS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in LAYER_KEYS:
        return f"model.layers.{parts[1]}.{LAYER_KEYS[parts[2]]}"
    raise ExportError(f"Parameter {name} has no Hugging Face Llama equivalent; the model is not a CogniMamba.")


def key_map(config: ModelConfig) -> dict[str, str]:
    """Every stored parameter of a model with this config: our name -> HF name (the tied head is left out)."""
    names = list(TOP_KEYS)
    if config.tie_embeddings:
        names.remove("output.weight")
    names += [f"layers.{i}.{k}" for i in range(config.n_layers) for k in LAYER_KEYS]
    return {n: hf_key(n) for n in names}


def hf_state_dict(model: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, contiguous on the CPU (optionally cast)."""
    model = unwrap(model)
    state = model.state_dict()
    out = {}
    for ours, theirs in key_map(model.config).items():
        t = state[ours].detach().to("cpu")
        out[theirs] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    return out


def llama_config(config: ModelConfig, tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of the equivalent `LlamaForCausalLM` (special-token ids only when a tokenizer is given)."""
    out = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "pretraining_tp": 1,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if tokenizer is not None:
        out.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    return out


def to_transformers(model: torch.nn.Module, *, attn_implementation: str = "sdpa"):
    """A live `transformers.LlamaForCausalLM` holding a copy of the model's weights (same device, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = unwrap(model).config
    fields = llama_config(config, None, torch.float32)
    for key in ("architectures", "model_type", "torch_dtype"):
        fields.pop(key)
    hf_cfg = LlamaConfig(**fields)
    hf_cfg._attn_implementation = attn_implementation
    hf = LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ExportError(f"Weights do not map onto LlamaForCausalLM (missing {missing}, unexpected {unexpected}).")
    if config.tie_embeddings:
        hf.tie_weights()
    return hf.to(next(unwrap(model).parameters()).device)


def generation_config(cfg: Config, tokenizer) -> dict[str, Any]:
    """generation_config.json: our default sampling, stopping where our chat stops (<|end|>, EOS, role tokens)."""
    g = cfg.generation
    out: dict[str, Any] = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": list(tokenizer.chat_stop_ids),
        "pad_token_id": tokenizer.pad_id,
        "max_new_tokens": g.max_new_tokens,
        "do_sample": g.temperature > 0,
    }
    if g.temperature > 0:  # HF warns about sampling settings on greedy configs, so only write them here
        out["temperature"] = g.temperature
        out |= {k: v for k, v in (("top_k", g.top_k), ("top_p", g.top_p), ("min_p", g.min_p)) if v is not None}
    if g.repetition_penalty != 1.0:
        out["repetition_penalty"] = g.repetition_penalty
    return out


def tokenizer_files(tokenizer, max_seq_len: int) -> dict[str, str]:
    """File name -> text of the HF tokenizer files: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN,
                "additional_special_tokens": [*ROLE_TOKENS.values(), END_TOKEN]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "chat_template": chat_template_jinja(),
        "model_max_length": max_seq_len,
        "add_bos_token": False,  # our encode adds nothing; the chat template writes <|endoftext|> itself
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": tokenizer.to_hf().to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }


def export_hf(model: torch.nn.Module, tokenizer, config: Config, out_dir: str | Path, *,
              dtype: str | None = None, force: bool = False) -> Path:
    """Write a Hugging Face Llama folder (weights in `dtype`: float32 / float16 / bfloat16, default: as trained)."""
    if tokenizer is None or not hasattr(tokenizer, "to_hf"):
        raise ExportError("The checkpoint has no tokenizer, and a Hugging Face export needs one; pass --tokenizer "
                          "with the tokenizer the model was trained with.")
    if dtype is not None and dtype not in DTYPES:
        raise ExportError(f"Unknown dtype {dtype!r} for a Hugging Face export; use one of: {', '.join(DTYPES)}.")
    model_cfg = unwrap(model).config
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ExportError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only "
                          f"{model_cfg.vocab_size}; export with the tokenizer the model was trained with.")
    out = Path(out_dir)
    check_target(out, force)
    weights = hf_state_dict(model, DTYPES[dtype] if dtype else None)
    stored_dtype = next(iter(weights.values())).dtype

    def fill(tmp: Path) -> None:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {
            "config.json": json.dumps(llama_config(model_cfg, tokenizer, stored_dtype), indent=2) + "\n",
            "generation_config.json": json.dumps(generation_config(config, tokenizer), indent=2) + "\n",
            **tokenizer_files(tokenizer, model_cfg.max_seq_len),
        }
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_dir_atomically(out, fill)
