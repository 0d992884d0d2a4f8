"""OpenAI's response bodies: whole replies and streamed chunks, for chat and for text completions."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import Job


def usage(job: Job) -> dict[str, int]:
    """OpenAI's token counts: the prompt as the model saw it, and the tokens generated."""
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


class _Format:
    object_whole = object_chunk = ""
    id_prefix = ""

    def __init__(self, model: str):
        self.model = model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage_chunk(self, counts: dict[str, int]) -> dict[str, Any]:
        """The extra last chunk asked for by stream_options.include_usage: no choices, only usage."""
        return {**self._envelope(self.object_chunk, []), "usage": counts}


class ChatFormat(_Format):
    """chat.completion and chat.completion.chunk."""

    object_whole, object_chunk, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def opening(self, index: int = 0) -> dict[str, Any]:
        """The first chunk of a choice announces the assistant's role (what OpenAI sends before any content)."""
        return self._envelope(self.object_chunk, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}])

    def chunk(self, text: str, finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
        delta = {"content": text} if finish_reason is None else {}
        return self._envelope(self.object_chunk, [{"index": index, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def whole(self, choices: list[tuple[str, str | None]], counts: dict[str, int]) -> dict[str, Any]:
        """The whole reply: (text, finish reason) per choice, in index order."""
        body = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish} for i, (text, finish) in enumerate(choices)]
        return {**self._envelope(self.object_whole, body), "usage": counts}


class TextFormat(_Format):
    """text_completion (OpenAI uses the same object name for whole replies and chunks)."""

    object_whole = object_chunk = "text_completion"
    id_prefix = "cmpl"

    def opening(self, index: int = 0) -> None:
        return None

    def chunk(self, text: str, finish_reason: str | None = None, index: int = 0) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [{"index": index, "text": text, "logprobs": None,
                                                   "finish_reason": finish_reason}])

    def whole(self, choices: list[tuple[str, str | None]], counts: dict[str, int]) -> dict[str, Any]:
        body = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                for i, (text, finish) in enumerate(choices)]
        return {**self._envelope(self.object_whole, body), "usage": counts}
