"""Inference: the continuous-batching engine, its KV cache, streaming text and precision.

    from cogni_mamba.inference import Engine, load_model_for_inference
    model, tokenizer, config = load_model_for_inference("runs/demo/run", "cpu")
    engine = Engine(model, max_batch=8, bos_id=tokenizer.bos_id)
    request = engine.submit(prompt_ids, config.generation, stop_ids=tokenizer.chat_stop_ids)
    for token in request: ...        # inline: iterating drives the engine; engine.start() runs it in a thread

`EngineProcess` runs an Engine in a child process of its own (`serve --engine process`), with the same surface.
"""

from .cache import SlotCache
from .engine import Engine
from .loading import DTYPE_CHOICES, load_model_for_inference
from .precision import resolve_inference_dtype
from .remote import EngineProcess, RemoteRequest
from .request import EngineBusy, EngineStats, Request, greedy_settings
from .text import TextStream, stream_text, text_pieces

__all__ = ["DTYPE_CHOICES", "Engine", "EngineBusy", "EngineProcess", "EngineStats", "RemoteRequest", "Request",
           "SlotCache", "TextStream", "greedy_settings", "load_model_for_inference", "resolve_inference_dtype",
           "stream_text", "text_pieces"]
