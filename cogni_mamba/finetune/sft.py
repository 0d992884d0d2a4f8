"""Supervised fine-tuning data: conversations -> (input ids, labels) -> padded batches.

A conversation is rendered with the tokenizer's one chat template (`render_chat`), whose mask marks the
assistant tokens and their `<|end|>`. For next-token prediction the input is ids[:-1] and the label of
position t is ids[t + 1] when that token is an assistant token, else -100 (ignored by the loss), so the
model learns to write replies, never to predict the user.

Batches pad each row on the right to the longest row of the batch (pad id in the input, -100 in the
labels), optionally rounded up to a multiple (`ChatBatches(pad_multiple=)`); batches differ in length,
so the trainer marks that dimension dynamic when it compiles the model (one graph for all lengths). The model is causal, so padding after a conversation cannot change what the conversation's own
positions compute, and each conversation starts fresh (no packing across conversations: a reply
must not attend to an unrelated chat). The loss of a batch is the mean over its assistant tokens.

Conversations longer than the context are truncated at the context length (keeping the beginning,
where the prompt is); one that keeps no assistant token after truncation is skipped. Both are counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import CogniError
from ..model import IGNORE_INDEX

Example = tuple[list[int], list[int]]  # (input ids, labels), same length


@dataclass
class EncodeStats:
    """What happened to conversations on the way to training examples."""

    kept: int = 0
    truncated: int = 0  # longer than the context: cut at the context length, still used
    skipped_too_long: int = 0  # nothing to learn left after the cut
    supervised_tokens: int = 0
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self, context: int) -> str:
        """One line for the user."""
        text = (f"{self.kept:,} conversations, {self.tokens:,} tokens of which {self.supervised_tokens:,} "
                f"are assistant tokens (trained on)")
        if self.truncated or self.skipped_too_long:
            text += (f"; {self.truncated:,} longer than the context of {context} tokens were truncated to it"
                     f" and {self.skipped_too_long:,} were skipped (no assistant token within the context)")
        return text


def labels_from_mask(ids: Sequence[int], mask: Sequence[int]) -> Example:
    """(x, y) for next-token training: x = ids[:-1], y[t] = ids[t+1] where mask[t+1] else -100."""
    x = list(ids[:-1])
    y = [tok if keep else IGNORE_INDEX for tok, keep in zip(ids[1:], mask[1:], strict=True)]
    return x, y


def encode_conversation(messages: Sequence[dict], tokenizer: Any, max_len: int) -> tuple[Example | None, bool]:
    """((x, y) or None when nothing is learned within max_len tokens, whether it was truncated)."""
    ids, mask = tokenizer.render_chat(messages)
    truncated = len(ids) - 1 > max_len
    if truncated:
        ids, mask = ids[: max_len + 1], mask[: max_len + 1]  # max_len inputs predict max_len labels
    x, y = labels_from_mask(ids, mask)
    if all(label == IGNORE_INDEX for label in y):
        return None, truncated
    return (x, y), truncated


def encode_conversations(conversations: Sequence[Sequence[dict]], tokenizer: Any,
                         max_len: int) -> tuple[list[Example], EncodeStats]:
    """Training examples of every conversation that keeps an assistant token within max_len."""
    stats = EncodeStats()
    examples = []
    for messages in conversations:
        example, truncated = encode_conversation(messages, tokenizer, max_len)
        if example is None:
            stats.skipped_too_long += 1
            continue
        stats.truncated += int(truncated)
        stats.kept += 1
        stats.tokens += len(example[0])
        stats.supervised_tokens += sum(label != IGNORE_INDEX for label in example[1])
        examples.append(example)
    if not examples:
        raise CogniError(f"None of the {len(conversations):,} conversations has an assistant token within the "
                         f"context of {max_len} tokens; shorten the conversations or raise data.seq_len.")
    return examples, stats


def add_system_prompt(conversations: Sequence[list[dict]], text: str, seed: int,
                      share: float = 0.5) -> list[list[dict]]:
    """Give a seeded `share` of the conversations that have no system message the system message `text`.

    The CLI chat sends a default system prompt while API clients often send none; training on both
    kinds teaches the model to answer either way. An empty `text` leaves the conversations alone.
    """
    if not text:
        return [list(c) for c in conversations]
    rng = np.random.default_rng([seed, 7])
    out = []
    for messages in conversations:
        lacks = not any(m["role"] == "system" for m in messages)
        if lacks and rng.random() < share:
            messages = [{"role": "system", "content": text}, *messages]
        out.append(list(messages))
    return out


def padded_width(longest: int, multiple: int = 1, max_len: int | None = None) -> int:
    """`longest` rounded up to a multiple of `multiple`, but never past `max_len` (nor below `longest`)."""
    width = -(-longest // multiple) * multiple
    return max(longest, min(width, max_len)) if max_len is not None else width


def collate(examples: Sequence[Example], pad_id: int, *, multiple: int = 1,
            max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad examples to the longest one, rounded up to `multiple` (at most `max_len`): (x, y)
    int64 tensors of shape (B, T)."""
    width = padded_width(max(len(x) for x, _ in examples), multiple, max_len)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, labels) in enumerate(examples):
        x[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        y[row, : len(labels)] = torch.tensor(labels, dtype=torch.long)
    return x, y


def split_train_val(items: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """A seeded split: round(n * val_fraction) items (at least 1 when the fraction is > 0) go to val."""
    if not 0 <= val_fraction < 1:
        raise CogniError(f"--val-fraction must be in [0, 1), got {val_fraction}.")
    n = len(items)
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n_val >= n:
        raise CogniError(f"Only {n} conversations: too few to hold out {n_val} for validation; add data or "
                         "use --val-fraction 0.")
    order = np.random.default_rng(seed).permutation(n)
    val_idx = set(order[:n_val].tolist())
    train = [item for i, item in enumerate(items) if i not in val_idx]
    val = [item for i, item in enumerate(items) if i in val_idx]
    return train, val


def padded_eval_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The examples in order, as padded batches (for validation)."""
    return [collate(examples[i: i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]


class ChatBatches:
    """Endless padded batches of SFT examples, reshuffled each epoch, with an exact-resume state.

    Epoch e visits the examples in a permutation seeded by (seed, e); batch k of rank r takes the
    positions [(k * world_size + r) * B, ... + B) of it, wrapping around to the permutation's start to
    fill the last batch, so every batch has B rows and ranks never share a row within a batch step.
    Widths are padded up to `pad_multiple` (at most `max_len`); `variable_length` tells the trainer
    that batches differ in length (so a compiled model marks that dimension dynamic).
    """

    variable_length = True

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, *, seed: int = 1337,
                 rank: int = 0, world_size: int = 1, pad_multiple: int = 1, max_len: int | None = None):
        if not examples:
            raise CogniError("There are no training conversations left after the validation split; add data.")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.pad_multiple, self.max_len = pad_multiple, max_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches_per_epoch = math.ceil(len(self.examples) / (batch_size * world_size))
        self.epoch = 0
        self.batch = 0  # next batch index within the epoch
        self._order: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))
        return self._order

    def batch_indices(self) -> list[int]:
        """Example indices of the next batch of this rank (does not advance)."""
        order = self._permutation()
        start = (self.batch * self.world_size + self.rank) * self.batch_size
        return [int(order[(start + i) % len(order)]) for i in range(self.batch_size)]

    def __iter__(self) -> ChatBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in self.batch_indices()]
        self.batch += 1
        if self.batch == self.batches_per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        return collate(rows, self.pad_id, multiple=self.pad_multiple, max_len=self.max_len)

    def state_dict(self) -> dict[str, int]:
        """Where the next batch starts (plain ints)."""
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()`; the same examples and seed are required for the same batches."""
        if state["examples"] != len(self.examples) or state["seed"] != self.seed:
            raise CogniError(f"The checkpoint was trained on {state['examples']} examples with seed {state['seed']} "
                             f"but this run has {len(self.examples)} with seed {self.seed}; resume with the same "
                             "--data, --val-fraction and settings, or start a new --out.")
        self.epoch, self.batch, self._order = int(state["epoch"]), int(state["batch"]), None
