"""The server's model side: a request's prompt ids and settings -> text pieces, on a worker thread.

The server is stateless: every request carries its whole conversation, rendered with the tokenizer's
chat template (chat) or prefixed with BOS (completions), then `generate` runs with the tokenizer's stop
ids and the request's stop strings. Nothing here knows about HTTP.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import GenerationConfig
from ..errors import CogniError
from ..generate import StopStrings, generate, settings_with


@dataclasses.dataclass
class Job:
    """One generation: its inputs, a flag that cancels it, and what it reports once it has run."""

    prompt: list[int]
    settings: GenerationConfig
    stop_ids: tuple[int, ...]
    stop_strings: list[str]
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


class Engine:
    """A model and its tokenizer with the checkpoint's default sampling settings; thread-safe to share."""

    def __init__(self, model, tokenizer, generation: GenerationConfig | None = None, *, name: str = "cogni-mamba"):
        if tokenizer is None:
            raise CogniError("The server needs a tokenizer; use a checkpoint saved with its tokenizer/ folder.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig()
        self.name = name

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: Any = "cpu", *, name: str | None = None) -> Engine:
        """Load a checkpoint (or a run directory's latest) for serving."""
        from ..checkpoint import find_checkpoint, load_checkpoint_full

        model, tokenizer, config = load_checkpoint_full(path, device)
        if tokenizer is None:
            raise CogniError(f"Checkpoint {path} has no tokenizer/ folder, so its replies cannot be decoded; "
                             "serve a checkpoint written by `cogni-mamba train`.")
        return cls(model, tokenizer, config.generation, name=name or model_name_for(find_checkpoint(path)))

    @property
    def max_seq_len(self) -> int:
        """The model's context length in tokens (prompt and reply together)."""
        return self.model.config.max_seq_len

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation, ending with the assistant's turn marker."""
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return ids

    def text_prompt(self, text: str) -> list[int]:
        """Prompt ids of raw text, after BOS: documents in training start after <|endoftext|> too."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text, special=False)]

    def settings(self, max_new_tokens: int, changes: dict[str, Any]) -> GenerationConfig:
        """The checkpoint's sampling settings with a request's changes."""
        return settings_with(self.generation, max_new_tokens=max_new_tokens, **changes)

    def chat_stop_ids(self) -> tuple[int, ...]:
        """The tokenizer's end-of-turn ids (<|end|>, EOS, and role tokens), as the Chatbot uses."""
        return tuple(sorted(self.tokenizer.chat_stop_ids))

    def text_stop_ids(self) -> tuple[int, ...]:
        return (self.tokenizer.eos_id,)

    def run(self, job: Job) -> Iterator[str]:
        """The reply's text pieces as they are made; checks `job.cancel` before every new token.

        Sets job.completion_tokens (tokens generated) and job.finish_reason ("stop" for a stop id or
        stop string, "length" for max_new_tokens or a full context, "cancelled" when cancelled).
        """
        tokens = generate(self.model, job.prompt, job.settings, stop_ids=job.stop_ids,
                          bos_id=self.tokenizer.bos_id, pad_id=self.tokenizer.pad_id, on_overflow="error")
        # Special tokens are not shown, as in the Chatbot (a stop id ends the reply before it is decoded anyway).
        text = StopStrings(lambda ids: self.tokenizer.decode(ids, skip_special=True), job.stop_strings)
        try:
            for token in tokens:
                job.completion_tokens += 1
                if job.cancel.is_set():
                    job.finish_reason = "cancelled"
                    return
                piece = text.put(token)
                if piece:
                    yield piece
                if text.stopped:
                    job.finish_reason = "stop"
                    return
            job.finish_reason = tokens.finish_reason
            rest = text.flush()
            if rest:
                yield rest
        finally:
            tokens.close()  # frees the KV cache now, not when the generator is collected


def model_name_for(checkpoint_dir: Path) -> str:
    """A readable model id: "run/step-100" for a checkpoint inside a run directory, else the folder name."""
    checkpoint_dir = checkpoint_dir.resolve()
    return f"{checkpoint_dir.parent.name}/{checkpoint_dir.name}" if checkpoint_dir.parent.name else checkpoint_dir.name
