"""`train_bpe`: a byte-level BPE trained on .txt / .jsonl / .parquet corpora with Hugging Face `tokenizers`.

The vocabulary has exactly the size asked for: the 6 special tokens (ids 0..5), the 256 byte tokens, then
merges. The model's vocabulary is that size rounded up to a multiple of 64 (so ask for a multiple of 64 to
waste no embedding rows). Every 20th document is held out of training to measure compression (UTF-8 bytes
per token). Training is deterministic: the same inputs and settings write byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from ..errors import CogniError
from .core import Tokenizer, special_added_tokens
from .specials import EOS_TOKEN, SPECIAL_TOKENS

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte plus the specials, before any merge
CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")
HELDOUT_EVERY = 20  # document i is held out when i % 20 == 19 (5%)


def train_bpe(texts_or_files: Iterable[str | os.PathLike] | os.PathLike, vocab_size: int,
              out_dir: str | os.PathLike | None = None, *, progress: bool = True, text_field: str = "text",
              ) -> Tokenizer:
    """Train a byte-level BPE of exactly `vocab_size` tokens; save it to out_dir when given.

    Items that are paths (`pathlib.Path`, os.PathLike) are corpus files; plain `str` items are texts.
    The held-out compression lands in `tokenizer.train_report`.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise CogniError(f"Vocabulary size {vocab_size} is too small to train: it must be at least {MIN_VOCAB_SIZE} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens); 4096 suits small models.")
    train_docs, heldout_docs = split_heldout(read_documents(as_sources(texts_or_files), text_field, progress))
    if not train_docs:
        raise CogniError("The corpus is empty: the given files or texts contain no text to train on.")
    hf = train_hf(train_docs, vocab_size, progress)
    got = hf.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        raise CogniError(f"The corpus supports only {got} tokens, fewer than the {vocab_size} asked for; pass a "
                         f"smaller --vocab-size or more text.")
    tok = Tokenizer(hf, kind="bpe", name=f"bpe-{vocab_size}")
    tok.train_report = compression_report(tok, train_docs, heldout_docs)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def as_sources(texts_or_files: Any) -> list[str | Path]:
    """A list of corpus items: Path for files, str for texts."""
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    return [item if isinstance(item, str) else Path(item) for item in texts_or_files]


def train_hf(docs: list[str], vocab_size: int, progress: bool) -> HFTokenizer:
    """Run the `tokenizers` BPE trainer over docs (specials first, then all 256 bytes, then merges)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_added_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    hf.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return hf


def split_heldout(docs: Iterable[str]) -> tuple[list[str], list[str]]:
    """(train, held-out) by position: every HELDOUT_EVERY-th non-empty document is held out."""
    train, heldout = [], []
    for i, doc in enumerate(d for d in docs if d):
        (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).append(doc)
    return train, heldout


def compression_report(tok: Tokenizer, train_docs: list[str], heldout_docs: list[str]) -> dict[str, Any]:
    """UTF-8 bytes per token on the held-out documents (on the training ones where none were held out)."""
    docs = heldout_docs or train_docs
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs, special=False))
    return {"vocab_size": tok.real_vocab_size, "train_docs": len(train_docs), "heldout_docs": len(heldout_docs),
            "measured_on": "heldout" if heldout_docs else "train", "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}


# --- reading corpora --------------------------------------------------------------------------------

def read_documents(sources: list[str | Path], text_field: str, progress: bool) -> Iterator[str]:
    """Documents of every source in order, with a progress bar over the file bytes read."""
    files = [s for s in sources if isinstance(s, Path)]
    for f in files:
        check_corpus_file(f)
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus", disable=not progress or not files) as bar:
        for source in sources:
            if isinstance(source, str):
                yield source
                continue
            yield from file_documents(source, text_field)
            bar.update(source.stat().st_size)


def check_corpus_file(path: Path) -> None:
    """A CogniError for a missing file or one whose type we cannot read."""
    if not path.is_file():
        raise CogniError(f"Corpus file {path} does not exist; check the path passed to --data.")
    if path.suffix not in CORPUS_SUFFIXES:
        raise CogniError(f"Cannot read corpus file {path}: use {', '.join(CORPUS_SUFFIXES)} files.")


def file_documents(path: Path, text_field: str) -> Iterator[str]:
    """Documents of one corpus file, by its type."""
    if path.suffix == ".txt":
        return txt_documents(path)
    if path.suffix == ".jsonl":
        return jsonl_documents(path, text_field)
    return parquet_documents(path, text_field)


def txt_documents(path: Path) -> Iterator[str]:
    """Documents separated by <|endoftext|> (the TinyStories format), else one per line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    # The separator itself is a special token, so it must not be learned as merges.
    yield from (text.split(EOS_TOKEN) if EOS_TOKEN in text else text.splitlines(keepends=True))


def jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` string of each JSON line."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise CogniError(f"Line {n} of {path} is not valid JSON; fix or remove it.") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else "none"
                raise CogniError(f"Line {n} of {path} has no field {text_field!r} (fields: {fields}); "
                                 f"pass --text-field to name the field holding the text.")
            value = record[text_field]  # as `prepare` reads it: a number becomes its text, null no text
            yield "" if value is None else str(value)


def parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The `text_field` column of a parquet file, read in batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CogniError("Reading .parquet corpora needs pyarrow: pip install 'cogni-mamba[data]'.") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise CogniError(f"Cannot read {path} as parquet ({type(e).__name__}); check that the file is whole.") \
            from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise CogniError(f"{path} has no column {text_field!r} (columns: {', '.join(columns)}); pass --text-field "
                         f"to name the column holding the text.")
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
