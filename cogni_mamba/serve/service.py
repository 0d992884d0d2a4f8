"""The server's model side: prompts and settings for a request, and the shared inference engine.

The server is stateless: every request carries its whole conversation, rendered with the tokenizer's
chat template (chat) or prefixed with BOS (completions). Every request runs in one continuous-batching
engine (`max_batch` rows, a bounded first-come queue): an `EngineProcess`, the model in a child process of its
own (`serve`'s default), or an `Engine` on a background thread of this process (`serve --engine thread`, and
`Service(model, ...)`).
Nothing here knows HTTP.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..config import GenerationConfig
from ..errors import CogniError
from ..generate import settings_with
from ..inference import Engine, Request
from ..inference.precision import weights_label

DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_SIZE = 32


class Service:
    """A model, its tokenizer, the checkpoint's default sampling settings and the engine that runs them."""

    def __init__(self, model, tokenizer, generation: GenerationConfig | None = None, *, name: str = "cogni-mamba",
                 max_batch: int = DEFAULT_MAX_BATCH, queue_size: int = DEFAULT_QUEUE_SIZE,
                 threads: int | str | None = None, engine: Any = None, context: int | None = None):
        """`model` runs in an Engine on a thread of this process; or model None and `engine` an EngineProcess
        (which holds the model in its own process), with `context` the model's context length."""
        if tokenizer is None:
            raise CogniError("The server needs a tokenizer; use a checkpoint saved with its tokenizer/ folder.")
        self.tokenizer = tokenizer
        self.generation = generation or GenerationConfig()
        self.name = name
        if engine is None:
            self.model = model.eval()
            self.max_seq_len = model.config.max_seq_len  # the model's context (prompt and reply together)
            self.dtype = weights_label(model)
            # threads "auto": the engine's thread times its step at 1, half and all but one of torch's threads (a
            # core stays for the event loop) and keeps the fastest (a small model often runs faster on one).
            engine = Engine(model, max_batch=max_batch, max_queue=queue_size, bos_id=tokenizer.bos_id, threads=threads)
        else:
            self.model, self.max_seq_len, self.dtype = None, context, engine.info["dtype"]
        self.engine = engine

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: Any = "cpu", *, name: str | None = None, dtype: str = "auto",
                        quantize: str | None = None, compile: bool = False, engine_process: bool = False,
                        **kwargs: Any) -> Service:
        """Load a checkpoint (or a run directory's latest) for serving, in `dtype` (auto: bf16 where native), with
        int8 weights when quantize="int8" and one-row decode steps compiled with `compile` (see
        `load_model_for_inference`; the child process builds it before it says it is ready). With engine_process,
        the model is loaded and run in a child process (`inference.EngineProcess`)."""
        from ..checkpoint import find_checkpoint, load_config_of, load_tokenizer_of
        from ..inference import load_model_for_inference

        checkpoint = find_checkpoint(path)
        name = name or model_name_for(checkpoint)
        if not engine_process:
            model, tokenizer, config = load_model_for_inference(checkpoint, device, dtype, quantize=quantize,
                                                                compile=compile)
            _need_tokenizer(tokenizer, checkpoint)
            return cls(model, tokenizer, config.generation, name=name, **kwargs)
        from ..inference import EngineProcess, resolve_inference_dtype

        resolve_inference_dtype(dtype, device)  # a bad name fails here, before a process starts
        config = load_config_of(checkpoint)
        tokenizer = load_tokenizer_of(checkpoint, config)
        _need_tokenizer(tokenizer, checkpoint)
        engine = EngineProcess(checkpoint, device, dtype, max_batch=kwargs.get("max_batch", DEFAULT_MAX_BATCH),
                               max_queue=kwargs.get("queue_size", DEFAULT_QUEUE_SIZE), threads=kwargs.get("threads"),
                               max_len=config.model.max_seq_len, bos_id=tokenizer.bos_id, quantize=quantize,
                               compile=compile)
        return cls(None, tokenizer, config.generation, name=name, engine=engine, context=config.model.max_seq_len)

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

    def submit(self, prompt: list[int], settings: GenerationConfig, stop_ids: Iterable[int], *,
               n: int = 1) -> list[Request]:
        """Queue n generations of one prompt in the engine, prefilled once (EngineBusy when its queue is full)."""
        return self.engine.submit_samples(prompt, settings, n, stop_ids=stop_ids, on_overflow="error")

    def decoder(self):
        """A fresh incremental decoder; special tokens are not shown, as in the Chatbot."""
        return self.tokenizer.stream_decoder(skip_special=True)


def _need_tokenizer(tokenizer: Any, checkpoint: Path) -> None:
    if tokenizer is None:
        raise CogniError(f"Checkpoint {checkpoint} has no tokenizer/ folder, so its replies cannot be decoded; "
                         "serve a checkpoint written by `cogni-mamba train`.")


def model_name_for(checkpoint_dir: Path) -> str:
    """A readable model id: "run/step-100" for a checkpoint inside a run directory, else the folder name."""
    checkpoint_dir = checkpoint_dir.resolve()
    return f"{checkpoint_dir.parent.name}/{checkpoint_dir.name}" if checkpoint_dir.parent.name else checkpoint_dir.name
