"""The Chatbot: conversation history -> chat template -> generate -> a stream of text pieces.

Shared by the CLI chat, the server and the demo. It never prints and never reads input: callers
show what `reply()` yields. The history keeps every turn (for saving); only the rendering sent to
the model is trimmed, from the oldest turns, so the system prompt and the newest user message
always fit with room left for the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import GenerationConfig
from .errors import CogniError
from .generate import StopStrings, generate, settings_with

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

Message = dict[str, str]


def fit_history(system: Sequence[Message], turns: Sequence[Message],
                count_tokens: Callable[[list[Message]], int], budget: int) -> list[Message]:
    """The system messages plus the newest turns whose rendering fits in `budget` tokens.

    Whole turns are dropped from the oldest, so the kept part starts at a user message; the newest
    user message (the last turn) is always kept, even when it alone exceeds the budget.
    """
    start, last = 0, len(turns) - 1
    while start < last and count_tokens([*system, *turns[start:]]) > budget:
        start += 1
        while start < last and turns[start]["role"] != "user":
            start += 1
    return [*system, *turns[start:]]


def reply_budget(max_seq_len: int, max_new_tokens: int) -> int:
    """Prompt tokens allowed so that min(max_new_tokens, half the context) remain for the answer."""
    return max_seq_len - min(max_new_tokens, max_seq_len // 2)


class Chatbot:
    """A conversation with a model: `reply(message)` streams the answer, `chat(message)` returns it whole."""

    def __init__(self, model, tokenizer, generation: GenerationConfig | None = None, *,
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = generation or GenerationConfig()
        self.system_prompt = system_prompt
        self.turns: list[Message] = []
        self.finish_reason: str | None = None  # "stop" or "length" once a reply has ended
        self.stop_ids = frozenset(tokenizer.chat_stop_ids)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs) -> Chatbot:
        """A Chatbot for a checkpoint (or run) directory, with its saved generation settings."""
        from .checkpoint import load_checkpoint_full

        model, tokenizer, config = load_checkpoint_full(path, device)
        if tokenizer is None:
            raise CogniError(f"Checkpoint {path} has no tokenizer/ folder, so its ids cannot be turned into text; "
                             "use a checkpoint saved by `cogni-mamba train`.")
        return cls(model, tokenizer, config.generation, **kwargs)

    # --- state ------------------------------------------------------------------------------------

    @property
    def messages(self) -> list[Message]:
        """The whole conversation, system prompt first."""
        return [*self._system(), *self.turns]

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.turns.clear()
        self.finish_reason = None

    def configure(self, **settings: Any) -> GenerationConfig:
        """Change the default generation settings for later replies; returns them."""
        self.settings = settings_with(self.settings, **settings)
        return self.settings

    def _system(self) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []

    # --- replying ---------------------------------------------------------------------------------

    def reply(self, message: str, *, stop: Iterable[str] = (), **settings: Any) -> Iterator[str]:
        """Add the user's message and stream the answer's text pieces; the answer joins the history.

        Keyword arguments override generation settings for this reply only (temperature=0.2, ...);
        `stop` adds stop strings. Closing the iterator early keeps the part already streamed.
        """
        cfg = settings_with(self.settings, **settings)
        ids = self.prompt_ids([*self.turns, {"role": "user", "content": message}], cfg.max_new_tokens)
        self.turns.append({"role": "user", "content": message})
        return self._stream(ids, cfg, stop, record=True)

    def chat(self, message: str, **settings: Any) -> str:
        """The whole answer to a message (the history grows as with `reply`)."""
        return "".join(self.reply(message, **settings))

    def stream(self, messages: Sequence[Mapping[str, str]], *, stop: Iterable[str] = (),
               **settings: Any) -> Iterator[str]:
        """Answer a conversation given whole (e.g. by an HTTP request), leaving this bot's history alone."""
        cfg = settings_with(self.settings, **settings)
        system = [dict(m) for m in messages if m["role"] == "system"]
        turns = [dict(m) for m in messages if m["role"] != "system"]
        return self._stream(self.prompt_ids(turns, cfg.max_new_tokens, system=system), cfg, stop, record=False)

    def prompt_ids(self, turns: Sequence[Message], max_new_tokens: int, *,
                   system: Sequence[Message] | None = None) -> list[int]:
        """Template ids of the conversation that fits the context, ending with the assistant's cue."""
        max_seq_len = self.model.config.max_seq_len
        system = self._system() if system is None else list(system)

        def count(msgs: list[Message]) -> int:
            return len(self._render(msgs))

        kept = fit_history(system, list(turns), count, reply_budget(max_seq_len, max_new_tokens))
        ids = self._render(kept)
        if len(ids) >= max_seq_len:
            raise CogniError(f"The message needs {len(ids)} tokens with the system prompt but the model's context "
                             f"holds {max_seq_len}; send a shorter message (or a shorter system prompt).")
        return ids

    def _render(self, messages: Sequence[Message]) -> list[int]:
        ids, _ = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return list(ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)

    def _stream(self, ids: list[int], cfg: GenerationConfig, stop: Iterable[str], *, record: bool) -> Iterator[str]:
        tokens = generate(self.model, ids, cfg, stop_ids=self.stop_ids, bos_id=self.tokenizer.bos_id,
                          pad_id=self.tokenizer.pad_id)
        text = StopStrings(self._decode, list(stop))
        pieces: list[str] = []
        self.finish_reason = None
        try:
            for token in tokens:
                piece = text.put(token)
                if piece:
                    pieces.append(piece)
                    yield piece
                if text.stopped:
                    break
            tail = text.flush()
            if tail:
                pieces.append(tail)
                yield tail
        finally:
            tokens.close()
            self.finish_reason = "stop" if text.stopped else tokens.finish_reason
            if record:
                self.turns.append({"role": "assistant", "content": "".join(pieces)})
