"""The special tokens every Cogni-Mamba tokenizer carries (the chat template that uses them is in chat_template.py).

`<|endoftext|>` is both BOS and EOS (GPT-2's convention): pretraining documents are separated by it, so a
conversation starts like any new document. The role tokens open a turn and `<|end|>` closes it.
"""

from __future__ import annotations

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_TOKEN = "<|end|>"
# Order fixes the ids a new tokenizer gives them (GPT-2 already has <|endoftext|> = 50256, so the rest
# follow it at 50257..50261; a trained BPE puts all six first, at 0..5).
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS["system"], ROLE_TOKENS["user"], ROLE_TOKENS["assistant"],
                  END_TOKEN)
