"""The Chatbot: conversation history -> chat template -> the inference engine -> a stream of text pieces.

Shared by the CLI chat, the server and the demo. It never prints and never reads input: callers
show what `reply()` yields. The history keeps every turn (for saving); only the rendering sent to
the model is trimmed, from the oldest turns, so the system prompt and the newest user message
always fit with room left for the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .config import GenerationConfig
from .errors import CogniError
from .generate import settings_with
from .inference import Engine, stream_text

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
                 system_prompt: str | None = DEFAULT_SYSTEM_PROMPT, engine: Engine | None = None,
                 threads: int | str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = generation or GenerationConfig()
        self.system_prompt = system_prompt
        self.turns: list[Message] = []
        self.finish_reason: str | None = None  # "stop", "length" or "cancelled" once a reply has ended
        self.stop_ids = frozenset(tokenizer.chat_stop_ids)
        # One conversation needs one cache row; the engine runs inline as the reply is read (threads: see Engine).
        self.engine = engine or Engine(model, max_batch=1, bos_id=tokenizer.bos_id, threads=threads)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", *, dtype: str = "auto", quantize: str | None = None,
                        compile: bool = False, **kwargs) -> Chatbot:
        """A Chatbot for a checkpoint (or run) directory, with its saved generation settings (dtype, quantize
        and compile: see `load_model_for_inference`)."""
        from .inference import load_model_for_inference

        model, tokenizer, config = load_model_for_inference(path, device, dtype, quantize=quantize, compile=compile)
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
        return self._stream(ids, cfg, stop)

    def chat(self, message: str, **settings: Any) -> str:
        """The whole answer to a message (the history grows as with `reply`)."""
        return "".join(self.reply(message, **settings))

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

    def _stream(self, ids: list[int], cfg: GenerationConfig, stop: Iterable[str]) -> Iterator[str]:
        request = self.engine.submit(ids, cfg, stop_ids=self.stop_ids)
        pieces: list[str] = []
        self.finish_reason = None
        try:
            for piece in stream_text(request, self.tokenizer.stream_decoder(skip_special=True), list(stop)):
                pieces.append(piece)
                yield piece
        finally:
            request.cancel()  # closed early: free the slot (a no-op once the reply has ended)
            self.finish_reason = request.finish_reason
            self.turns.append({"role": "assistant", "content": "".join(pieces)})
