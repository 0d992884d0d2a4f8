"""Pieces every export target shares: the chat template as Jinja, the rotary layout permutation, atomic output."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CogniError
from ..tokenizer.specials import END_TOKEN, EOS_TOKEN, ROLE_TOKENS


class ExportError(CogniError):
    """An export or import that cannot be done (bad target, incompatible checkpoint, missing tokenizer)."""


def chat_template_jinja() -> str:
    """Our chat template (tokenizer/specials.py) written as the Jinja that HF and llama.cpp render.

    <|endoftext|> then <|role|>content<|end|> per message, then <|assistant|> for a generation prompt; an
    unknown role raises, as our `render_chat` does. Built from the same constants, so the two cannot drift.
    """
    table = ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items())
    return (
        f"{{%- set role_tokens = {{{table}}} -%}}"
        f"{{{{- '{EOS_TOKEN}' -}}}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] not in role_tokens -%}"
        f"{{{{- raise_exception('Unknown chat role ' + message['role'] + '; use one of: {', '.join(ROLE_TOKENS)}.') -}}}}"
        "{%- endif -%}"
        f"{{{{- role_tokens[message['role']] + message['content'] + '{END_TOKEN}' -}}}}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{- '{ROLE_TOKENS['assistant']}' -}}}}{{%- endif -%}}"
    )


# --- rotary layouts -------------------------------------------------------------------------------
# Our rotary embedding (like HF Llama) rotates the pair (i, i + D/2) of each head; Meta's original
# Llama and llama.cpp's "llama" architecture rotate adjacent pairs (2i, 2i + 1). Reordering the output
# rows of wq and wk inside each head turns one layout into the other; attention scores are unchanged
# because q and k are reordered alike and the dot product does not care about the order of dimensions.

def half_split_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows (n_heads * D, dim) from the half-split layout to the interleaved one.

    Row h*D + s*D/2 + i (s in {0, 1}) moves to h*D + 2i + s.
    """
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, cols).transpose(1, 2).reshape(rows, cols)


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `half_split_to_interleaved`."""
    rows, cols = w.shape
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# --- atomic outputs ---------------------------------------------------------------------------------

def check_target(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing file or non-empty folder unless forced."""
    if out.exists() and not force and (out.is_file() or any(out.iterdir())):
        raise ExportError(f"{out} already exists; choose another --out or pass --force to replace it.")


