"""`Tokenizer`: one byte-level BPE interface over Hugging Face `tokenizers` (Rust), used everywhere.

GPT-2's files, a BPE trained here and the byte-level SimpleTokenizer are all byte-level BPE models (the
last one simply has no merges), so they share encoding, decoding, saving, streaming and the chat template.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CogniError
from ..files import write_text_atomically
from .chat_template import render_chat_ids, render_chat_text
from .specials import END_TOKEN, EOS_TOKEN, PAD_TOKEN, ROLE_TOKENS, SPECIAL_TOKENS

VOCAB_MULTIPLE = 64  # embedding rows are padded to this so matmuls hit fast kernel shapes
SIDECAR = "cogni_tokenizer.json"  # our metadata beside the standard tokenizer.json
FORMAT_VERSION = 1


def round_up(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """n rounded up to a multiple (50,257 -> 50,304)."""
    return -(-n // multiple) * multiple


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (what byte-level BPE vocabularies store).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are shifted to U+0100 onwards, in order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for offset, b in enumerate(shifted):
        table[b] = chr(256 + offset)
    return table


def special_added_tokens() -> list[AddedToken]:
    """SPECIAL_TOKENS as exact-match added tokens (no stripping, not normalised)."""
    return [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)
            for t in SPECIAL_TOKENS]




class StreamDecoder:
    """Turns ids arriving one at a time into text pieces, holding back incomplete UTF-8 characters.

    Joined pieces (plus `flush()`) equal `Tokenizer.decode` of all ids: both decode the concatenated bytes
    with U+FFFD for invalid sequences, so no replacement character appears that the full decode lacks.
    """

    def __init__(self, token_bytes: Sequence[bytes], skip: frozenset[int] = frozenset()):
        self._bytes = token_bytes
        self._skip = skip
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def put(self, token_id: int) -> str:
        """The text completed by this id ('' while a character is still split across ids)."""
        token_id = int(token_id)
        if token_id < 0 or token_id >= len(self._bytes) or token_id in self._skip:
            return ""  # vocabulary padding rows (and skipped specials) have no text
        return self._utf8.decode(self._bytes[token_id])

    def flush(self) -> str:
        """Whatever is held back (a dangling partial character becomes U+FFFD); the decoder starts afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """A byte-level BPE tokenizer with Cogni-Mamba's special tokens and chat template.

    `encode` adds no tokens of its own, but literal special-token text in the input ("<|endoftext|>",
    "<|user|>", ...) becomes the single special id (GPT-2's convention); pass `special=False` to encode it as
    ordinary text instead. `vocab_size` is the model's vocabulary: the real tokens rounded up to a multiple
    of 64; the extra ids decode to nothing.
    """

    def __init__(self, hf: HFTokenizer, *, kind: str, name: str, train_report: Mapping[str, Any] | None = None):
        check_byte_level_bpe(hf)
        hf.add_special_tokens(special_added_tokens())  # no-op for tokens it already has
        self._hf = hf
        self.kind = kind  # "gpt2" | "bpe" | "simple"
        self.name = name
        self.train_report = dict(train_report) if train_report else None
        self.special_tokens = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
        self.real_vocab_size = 1 + max(hf.get_vocab(with_added_tokens=True).values())
        self.vocab_size = round_up(self.real_vocab_size)
        self.eos_id = self.bos_id = self.special_tokens[EOS_TOKEN]
        self.pad_id = self.special_tokens[PAD_TOKEN]
        self.end_id = self.special_tokens[END_TOKEN]
        self.role_ids = {role: self.special_tokens[tok] for role, tok in ROLE_TOKENS.items()}
        # <|end|> or EOS ends an assistant turn; a role token means the model began the next turn itself.
        self.chat_stop_ids = (self.end_id, self.eos_id, *self.role_ids.values())
        self.special_ids = frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, vocab_size={self.vocab_size})"

    # --- encoding ---------------------------------------------------------------------------------

    @cached_property
    def _hf_plain(self) -> HFTokenizer:
        # A twin that treats special-token text as ordinary text (a flag on the instance, so keep two).
        twin = HFTokenizer.from_str(self._hf.to_str())
        twin.encode_special_tokens = True
        return twin

    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of text, adding no BOS/EOS; special-token text maps to its id unless special=False."""
        hf = self._hf if special else self._hf_plain
        return hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str], *, special: bool = True) -> list[list[int]]:
        """`encode` of many texts at once, in parallel on all cores (Rust threads)."""
        hf = self._hf if special else self._hf_plain
        batch = getattr(hf, "encode_batch_fast", hf.encode_batch)  # _fast (no offsets) needs tokenizers >= 0.21
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    # --- decoding ---------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of ids; ids outside the real vocabulary (padding rows) are dropped, specials kept unless asked."""
        if hasattr(ids, "tolist"):  # torch / numpy arrays
            ids = ids.tolist()
        n = self.real_vocab_size
        drop = self.special_ids if skip_special else ()
        kept = [i for i in ids if 0 <= i < n and i not in drop]
        # Filtering here (not tokenizers' skip flag) keeps "concatenate the bytes, then decode" semantics,
        # which StreamDecoder reproduces exactly.
        return self._hf.decode(kept, skip_special_tokens=False)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each id stands for (specials: their UTF-8 text), indexed by id."""
        char_to_byte = {c: b for b, c in byte_to_unicode().items()}
        table = [b""] * self.real_vocab_size
        for token, i in self._hf.get_vocab(with_added_tokens=False).items():
            try:
                table[i] = bytes(char_to_byte[c] for c in token)
            except KeyError:  # a plain-text entry some vocabularies keep (e.g. a special token's text)
                table[i] = token.encode("utf-8")
        for i, added in self._hf.get_added_tokens_decoder().items():
            table[i] = added.content.encode("utf-8")
        return table

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        """An incremental decoder: `.put(id) -> str` per generated id, `.flush() -> str` at the end."""
        return StreamDecoder(self.token_bytes, self.special_ids if skip_special else frozenset())

    # --- chat template ----------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                    ) -> tuple[list[int], list[int]]:
        """(ids, mask) of a conversation; mask is 1 exactly on assistant content tokens and their <|end|>."""
        return render_chat_ids(messages, lambda s: self.encode(s, special=False), self.special_tokens,
                               add_generation_prompt)

    def render_chat_text(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        """The same conversation as template text (what `decode(render_chat(...)[0])` gives back)."""
        return render_chat_text(messages, add_generation_prompt)

    # --- identity and files -----------------------------------------------------------------------

    @cached_property
    def fingerprint(self) -> str:
        """A short stable hash of what decides the ids: vocabulary, merges, added tokens, pre-tokenizer."""
        return fingerprint_of(self._hf)

    def to_hf(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (for exporters; do not mutate it)."""
        return self._hf

    def metadata(self) -> dict[str, Any]:
        """What the sidecar file records beside tokenizer.json."""
        return {"format": FORMAT_VERSION, "kind": self.kind, "name": self.name, "vocab_size": self.vocab_size,
                "real_vocab_size": self.real_vocab_size, "fingerprint": self.fingerprint,
                "special_tokens": self.special_tokens, "train_report": self.train_report}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write tokenizer.json (standard Hugging Face format) and our sidecar into directory."""
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CogniError(f"Cannot create the tokenizer directory {d} ({e.strerror}); choose a writable path.") \
                from None
        write_text_atomically(d / "tokenizer.json", self._hf.to_str(pretty=True) + "\n")
        write_text_atomically(d / SIDECAR, json.dumps(self.metadata(), indent=2, sort_keys=True) + "\n")
        return d


def check_byte_level_bpe(hf: HFTokenizer) -> None:
    """Reject tokenizer.json files we cannot stream-decode or round-trip (not byte-level BPE)."""
    if not isinstance(hf.model, models.BPE) or not isinstance(hf.decoder, decoders.ByteLevel):
        raise CogniError("Only byte-level BPE tokenizers (GPT-2 style) are supported; this tokenizer.json uses "
                         f"model {type(hf.model).__name__} with decoder {type(hf.decoder).__name__}.")


def fingerprint_of(hf: HFTokenizer) -> str:
    """sha256 (first 16 hex digits) of a canonical form, independent of the tokenizers version's JSON layout."""
    spec = json.loads(hf.to_str())
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in spec["model"].get("merges", [])]
    canonical = {
        "vocab": sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]),
        "merges": merges,
        "added": sorted((t["id"], t["content"], t["special"]) for t in spec.get("added_tokens", [])),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "normalizer": spec.get("normalizer"),
    }
    blob = json.dumps(canonical, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]
