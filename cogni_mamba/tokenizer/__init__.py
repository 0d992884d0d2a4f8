"""Tokenizers: GPT-2's byte-level BPE, a BPE trained on your corpus, and a byte-level fallback.

All share one interface (`Tokenizer`): encode / encode_batch / decode, `vocab_size` padded to a multiple
of 64, special ids (BOS = EOS = <|endoftext|>, a pad token, chat role tokens), the chat template
(`render_chat`), streaming decode, `save` and a `fingerprint`.

    tok = load_tokenizer("gpt2")          # or a directory, or "simple"
    tok = train_bpe([Path("corpus.txt")], vocab_size=4096, out_dir="tok/")
"""

from .chat_template import render_chat_text
from .core import SIDECAR, StreamDecoder, Tokenizer, round_up
from .loading import load_tokenizer
from .simple import SimpleTokenizer
from .specials import END_TOKEN, EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS
from .training import MIN_VOCAB_SIZE, train_bpe

__all__ = [
    "END_TOKEN", "EOS_TOKEN", "MIN_VOCAB_SIZE", "PAD_TOKEN", "ROLE_TOKENS", "SIDECAR", "SPECIAL_TOKENS",
    "SimpleTokenizer", "StreamDecoder", "Tokenizer", "load_tokenizer", "render_chat_text", "round_up", "train_bpe",
]
