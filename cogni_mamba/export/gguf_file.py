"""Export to a GGUF file for llama.cpp (architecture "llama", tokenizer "gpt2" byte-level BPE).

Tensor names follow llama.cpp (token_embd, blk.N.attn_q, ..., output_norm; output is left out when tied
to the embedding, as llama.cpp then reuses token_embd). llama.cpp's llama architecture rotates adjacent
pairs of each head (Meta's layout), so wq and wk rows are permuted from our half-split layout
(`half_split_to_interleaved`); everything else is stored as is. Precision: "f32"; "f16" (2-D weights f16,
norms f32); "q8_0" (2-D weights in 8-bit blocks of 32 with one f16 scale, through gguf.quants; a weight
whose rows are not a multiple of 32 long stays f16).

The vocabulary has one entry per embedding row: the tokenizer's tokens in byte-level form, its added
tokens (special ones typed CONTROL), and "[PAD<id>]" (typed UNUSED) for the rows that pad the
vocabulary to a multiple of 64.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import unwrap
from ..config import Config, ModelConfig
from ..files import write_file_atomically
from .common import ExportError, chat_template_jinja, check_target, half_split_to_interleaved

GGUF_DTYPES = ("f32", "f16", "q8_0")
LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "attention_norm.weight": "attn_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "output.weight": "output.weight"}
Q8_BLOCK = 32


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for one of our parameters."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def gguf_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """llama.cpp name -> float32 array in PyTorch's (out, in) layout, with wq/wk in the interleaved rope layout."""
    model = unwrap(model)
    cfg: ModelConfig = model.config
    state = model.state_dict()
    out = {}
    for name, t in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # llama.cpp falls back to token_embd when output is absent
        t = t.detach().to("cpu", torch.float32)
        if name.endswith("attention.wq.weight"):
            t = half_split_to_interleaved(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = half_split_to_interleaved(t, cfg.n_kv_heads)
        out[gguf_name(name)] = t.numpy()
    return out


def encode_tensor(array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """(data, gguf type) of one tensor at the requested precision; 1-D tensors (norms) always stay f32."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if array.ndim == 1 or dtype == "f32":
        return array.astype(np.float32), Q.F32
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return quants.quantize(array, Q.Q8_0), Q.Q8_0
    return array.astype(np.float16), Q.F16


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for every id below vocab_size, in id order."""
    from gguf import TokenType

    hf = tokenizer.to_hf()
    by_id = {i: tok for tok, i in hf.get_vocab(with_added_tokens=True).items()}
    added = hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def bpe_merges(tokenizer) -> list[str]:
    """The merges as "left right" strings (tokenizer.json stores pairs or strings depending on version)."""
    spec = json.loads(tokenizer.to_hf().to_str())
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]


def add_metadata(writer, cfg: ModelConfig, tokenizer, name: str, dtype: str) -> None:
    """The llama architecture's hyperparameters and the gpt2-style tokenizer."""
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    file_type = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(int(file_type[dtype]))
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)

    tokens, types = vocab_entries(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex: what our byte-level pre-tokenizer applies
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tokenizer))
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_eot_token_id(tokenizer.end_id)  # <|end|> closes a chat turn
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template_jinja())


def export_gguf(model: torch.nn.Module, tokenizer, config: Config, out_path: str | Path, dtype: str = "f16", *,
                force: bool = False) -> Path:
    """Write a llama.cpp GGUF file ("f32", "f16" or "q8_0") with the model, tokenizer and chat template."""
    from gguf import GGUFWriter

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"Unknown GGUF type {dtype!r}; use one of: {', '.join(GGUF_DTYPES)}.")
    if tokenizer is None or not hasattr(tokenizer, "to_hf"):
        raise ExportError("The checkpoint has no tokenizer, and a GGUF file needs one; pass --tokenizer with the "
                          "tokenizer the model was trained with.")
    cfg = unwrap(model).config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ExportError(f"The tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                          "export with the tokenizer the model was trained with.")
    if not bpe_merges(tokenizer):
        # gguf cannot write an empty merges array, and llama.cpp refuses a "gpt2" vocabulary without one.
        raise ExportError("The tokenizer has no BPE merges (the byte-level 'simple' tokenizer), which llama.cpp "
                          "cannot load; train a BPE tokenizer (`cogni-mamba tokenizer train`) for GGUF export.")
    out = Path(out_path)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; a GGUF export is one file, so pass --out like model.gguf.")
    check_target(out, force)
    tensors = {name: encode_tensor(a, dtype) for name, a in gguf_tensors(model).items()}

    def fill(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), "llama")
        add_metadata(writer, cfg, tokenizer, config.preset or "cogni-mamba", dtype)
        for name, (data, qtype) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_file_atomically(out, fill)
