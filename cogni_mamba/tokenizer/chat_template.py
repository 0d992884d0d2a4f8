"""The one chat template, as text and as token ids with a loss mask.

One string per conversation, no newlines added, so the text is exactly what the model sees:

    <|endoftext|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|>...

A generation prompt ends with `<|assistant|>`, and the model ends its turn with `<|end|>`. Message
contents are encoded with special tokens disabled, so a user who types "<|end|>" gets ordinary text
tokens, never a real turn boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..errors import CogniError
from .specials import END_TOKEN, EOS_TOKEN, ROLE_TOKENS


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(role, content) pairs of a chat, or a CogniError naming the first bad message."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise CogniError("Chat messages must be a list of {'role': ..., 'content': ...} dicts.")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise CogniError(f"Chat message {i} must be a dict with 'role' and 'content' keys, got {m!r:.80}.")
        role, content = m["role"], m["content"]
        if role not in ROLE_TOKENS:
            raise CogniError(f"Chat message {i} has role {role!r}; use one of: {', '.join(ROLE_TOKENS)}.")
        if not isinstance(content, str):
            raise CogniError(f"Chat message {i} has content of type {type(content).__name__}; it must be a string.")
        pairs.append((role, content))
    return pairs


def render_chat_text(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
    """The template as text (for display and debugging; ids come from `render_chat_ids`)."""
    parts = [EOS_TOKEN]
    for role, content in check_messages(messages):
        parts += [ROLE_TOKENS[role], content, END_TOKEN]
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def render_chat_ids(messages: Sequence[Mapping[str, str]], encode_plain: Callable[[str], list[int]],
                    special_ids: Mapping[str, int], add_generation_prompt: bool = False,
                    ) -> tuple[list[int], list[int]]:
    """Token ids of the template and a loss mask: 1 on assistant content tokens and their `<|end|>`.

    `encode_plain` must encode text without recognising special tokens; `special_ids` maps each token of
    SPECIAL_TOKENS to its id.
    """
    end = special_ids[END_TOKEN]
    ids, mask = [special_ids[EOS_TOKEN]], [0]
    for role, content in check_messages(messages):
        body = encode_plain(content)
        learn = int(role == "assistant")
        ids += [special_ids[ROLE_TOKENS[role]], *body, end]
        # The role token is part of the prompt (the chatbot writes it), so only what follows is learned.
        mask += [0] + [learn] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(special_ids[ROLE_TOKENS["assistant"]])
        mask.append(0)
    return ids, mask
