"""Cogni-Mamba: train a small Llama-style language model from scratch and chat with it."""

from .config import Config, DataConfig, GenerationConfig, ModelConfig, TrainConfig
from .errors import CogniError
from .model import CogniMamba, KVCache

__version__ = "0.1.0"

__all__ = [
    "CogniError", "CogniMamba", "Config", "DataConfig", "GenerationConfig", "KVCache", "ModelConfig",
    "TrainConfig", "__version__",
]


def __getattr__(name):
    # Heavier entry points load lazily so `import cogni_mamba` stays fast.
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    if name == "load_checkpoint":
        from .checkpoint import load_checkpoint
        return load_checkpoint
    if name == "Chatbot":
        from .chat import Chatbot
        return Chatbot
    raise AttributeError(f"module 'cogni_mamba' has no attribute {name!r}")
