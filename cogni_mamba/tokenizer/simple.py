"""SimpleTokenizer: the fallback that needs no files and no training; one token per UTF-8 byte."""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from .core import Tokenizer, byte_to_unicode


def byte_level_hf() -> HFTokenizer:
    """A byte-level BPE with no merges: id b is byte b (0..255), the specials follow at 256..261."""
    vocab = {char: b for b, char in byte_to_unicode().items()}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return hf


class SimpleTokenizer(Tokenizer):
    """Byte-level tokenizer: 256 byte ids + the special tokens (model vocabulary 320); same interface."""

    def __init__(self) -> None:
        super().__init__(byte_level_hf(), kind="simple", name="simple")
