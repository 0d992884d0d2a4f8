"""Sources -> token shards: `train.bin`, `val.bin` (flat token ids, memory-mappable) and `meta.json`.

Layout: every document is followed by one EOS token (doc EOS doc EOS ...), so EOS always marks the
end of a document and a window may cross documents the way the model will read them. Tokens are
uint16 when the vocabulary fits (<= 65,536 ids), else uint32. Documents are encoded with the
tokenizer's default `encode_batch`, so literal special-token text (e.g. a chat corpus written in the
chat template) becomes the special ids, as the chat template expects.

The split is by document: a document goes to val when a keyed hash of its text (key = seed) falls
below `val_fraction`, so it is fixed by seed, independent of chunking and of the order of the other
documents, and duplicates of a text never straddle train and val.

Writing is atomic: the shards are written under temp names and renamed, and meta.json is written
last (removed first when a run replaces an older one), so a folder without meta.json is never
treated as prepared. The hash of inputs and settings in meta.json lets a re-run skip the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np

from ..errors import CogniError
from ..files import write_text_atomically
from ..integrity import IntegrityError, seal_text, sha256_file, unseal, verification_enabled
from .sources import ReadStats, Source, SourceOptions, resolve_source

FORMAT_VERSION = 1
SPLITS = ("train", "val")


class PrepareError(CogniError):
    """Preparation cannot go on (tokenizer mismatch, no documents, bad settings)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val(doc: str, seed: int, val_fraction: float) -> bool:
    """Whether a document belongs to the val split: a keyed hash of its text below val_fraction."""
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(digest.digest(), "little") < val_fraction * 2.0**64


def read_meta(data_dir: str | os.PathLike) -> dict:
    """The meta.json of a prepared dataset folder, or a CogniError saying how to prepare one."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise CogniError(f"{data_dir} is not a prepared dataset (no meta.json); "
                         f"run `cogni-mamba prepare --source ... --out {data_dir}` first.")
    try:
        meta, _ = unseal(path.read_text(encoding="utf-8"), indent=2)
    except (OSError, UnicodeDecodeError, IntegrityError) as e:
        raise CogniError(f"{path} is damaged or unreadable ({e}); run `cogni-mamba prepare ... --force` to rebuild "
                         "it.") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CogniError(f"{path} has format {meta.get('format')!r}, this version reads {FORMAT_VERSION}; "
                         "re-run `cogni-mamba prepare ... --force`.")
    return meta


def verify_shard(data_dir: str | os.PathLike, split: str, meta: dict) -> None:
    """Check a split's .bin against the sha256 in meta.json (streamed; COGNI_MAMBA_NO_VERIFY=1 skips it)."""
    digest = meta.get("sha256", {}).get(f"{split}.bin")
    if digest is None or not verification_enabled():
        return
    path = Path(data_dir) / f"{split}.bin"
    if sha256_file(path) != digest:
        raise CogniError(f"{path} does not match the checksum in meta.json, so it is damaged; re-run "
                         "`cogni-mamba prepare ... --force` (or set COGNI_MAMBA_NO_VERIFY=1 to use it anyway).")


def input_hash(sources: list[Source], fingerprint: str, val_fraction: float, seed: int) -> str:
    """A hash of everything that decides the shards' content."""
    settings = {"format": FORMAT_VERSION, "sources": [repr(s.key) for s in sources],
                "tokenizer": fingerprint, "val_fraction": val_fraction, "seed": seed}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# --- tokenizing -----------------------------------------------------------------------------

def _chunks(docs: Iterable[str], chunk_bytes: int) -> Iterator[list[str]]:
    """Documents grouped into lists of about chunk_bytes characters (one encode_batch call each)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def with_eos(encoded: list[list[int]], eos_id: int) -> np.ndarray:
    """Token lists flattened into one int64 array with eos_id after each one."""
    lengths = np.fromiter((len(e) + 1 for e in encoded), dtype=np.int64, count=len(encoded))
    out = np.empty(int(lengths.sum()), dtype=np.int64)
    eos_at = np.cumsum(lengths) - 1
    is_token = np.ones(len(out), dtype=bool)
    is_token[eos_at] = False
    out[is_token] = np.fromiter(chain.from_iterable(encoded), dtype=np.int64, count=len(out) - len(encoded))
    out[eos_at] = eos_id
    return out


@dataclass
class _Encoded:
    tokens: dict[str, np.ndarray]  # split -> flat tokens with EOS after each document
    docs: dict[str, int]
    text_bytes: dict[str, int]


def _encode_chunk(tokenizer, chunk: list[str], seed: int, val_fraction: float, dtype: np.dtype) -> _Encoded:
    encoded = tokenizer.encode_batch(chunk)
    flags = [is_val(d, seed, val_fraction) for d in chunk]
    result = _Encoded({}, {}, {})
    for split, want in (("train", False), ("val", True)):
        idx = [i for i, f in enumerate(flags) if f == want]
        tokens = with_eos([encoded[i] for i in idx], tokenizer.eos_id)
        if tokens.size and not 0 <= tokens.min() <= tokens.max() < tokenizer.vocab_size:
            raise PrepareError(f"The tokenizer produced an id outside 0..{tokenizer.vocab_size - 1} "
                               "(its vocab_size); the tokenizer files are inconsistent, rebuild them.")
        result.tokens[split] = tokens.astype(dtype)
        result.docs[split] = len(idx)
        result.text_bytes[split] = sum(len(chunk[i].encode("utf-8")) for i in idx)
    return result


def _progress_bar(total: int | None, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=not enabled,
                dynamic_ncols=True, smoothing=0.1)


def _tokenize_to(files: dict[str, object], sources: list[Source], tokenizer, *, seed: int,
                 val_fraction: float, dtype: np.dtype, chunk_bytes: int, progress: bool) -> dict:
    """Stream every source through the tokenizer into the open split files; returns the counts."""
    totals = [s.total_bytes for s in sources]
    bar = _progress_bar(None if None in totals else sum(totals), progress)
    stats = ReadStats(on_bytes=bar.update)
    counts = {s: {"tokens": 0, "documents": 0, "text_bytes": 0} for s in SPLITS}
    docs = chain.from_iterable(s.read(stats) for s in sources)

    def write(enc: _Encoded) -> None:
        for split in SPLITS:
            enc.tokens[split].tofile(files[split])
            counts[split]["tokens"] += int(enc.tokens[split].size)
            counts[split]["documents"] += enc.docs[split]
            counts[split]["text_bytes"] += enc.text_bytes[split]

    # One worker encodes chunk k (encode_batch runs on all cores) while this thread reads chunk k+1.
    with bar, ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for chunk in _chunks(docs, chunk_bytes):
            pending.append(pool.submit(_encode_chunk, tokenizer, chunk, seed, val_fraction, dtype))
            if len(pending) > 1:
                write(pending.popleft().result())
        while pending:
            write(pending.popleft().result())
    return {"splits": counts, "skipped": stats.skipped, "replaced": stats.replaced}


# --- the whole job --------------------------------------------------------------------------

def _check_existing(out: Path, fingerprint: str, digest: str, force: bool) -> dict | None:
    """The existing meta when the folder already holds this exact preparation; errors on a tokenizer clash."""
    if not (out / "meta.json").is_file():
        return None
    try:
        meta = read_meta(out)
    except CogniError:
        if force:
            return None
        raise
    if meta.get("tokenizer_fingerprint") != fingerprint and not force:
        raise PrepareError(f"{out} was prepared with a different tokenizer; use another --out folder, "
                           "or pass --force to replace it (shards of two tokenizers are never mixed).")
    complete = all((out / f"{s}.bin").is_file() and (out / f"{s}.bin").stat().st_size
                   == meta["splits"][s]["tokens"] * np.dtype(meta["dtype"]).itemsize for s in SPLITS)
    return meta if (meta.get("input_hash") == digest and complete and not force) else None


def prepare(sources: list[Source | str], tokenizer, out_dir: str | os.PathLike, *, val_fraction: float = 0.005,
            seed: int = 1337, force: bool = False, progress: bool = True, chunk_bytes: int = 1 << 21) -> dict:
    """Tokenize the sources into out_dir/{train,val}.bin + meta.json; returns the meta (skips if up to date)."""
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    if not sources:
        raise PrepareError("No sources given; pass at least one --source.")
    if isinstance(tokenizer, str | os.PathLike):
        from ..tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer)
    sources = [resolve_source(s, SourceOptions()) if isinstance(s, str) else s for s in sources]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out} exists and is not a folder; choose another --out.")
    digest = input_hash(sources, tokenizer.fingerprint, val_fraction, seed)
    existing = _check_existing(out, tokenizer.fingerprint, digest, force)
    if existing is not None:
        return {**existing, "skipped_work": True}

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = {s: out / f"{s}.bin.tmp-{os.getpid()}" for s in SPLITS}
    try:
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            counts = _tokenize_to({"train": ftrain, "val": fval}, sources, tokenizer, seed=seed,
                                  val_fraction=val_fraction, dtype=dtype, chunk_bytes=chunk_bytes,
                                  progress=progress)
        n_docs = sum(c["documents"] for c in counts["splits"].values())
        if n_docs == 0:
            raise PrepareError(f"No documents found in {', '.join(s.description for s in sources)} "
                               f"({counts['skipped']} empty ones skipped); check the source.")
        meta = {"format": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "dtype": dtype.name,
                "eos": "after each document", **counts, "sources": [s.description for s in sources],
                "val_fraction": val_fraction, "seed": seed, "input_hash": digest,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (out / "meta.json").unlink(missing_ok=True)  # from here on the folder reads as unprepared
        for s in SPLITS:
            os.replace(tmp[s], out / f"{s}.bin")
        meta["sha256"] = {f"{s}.bin": sha256_file(out / f"{s}.bin") for s in SPLITS}
        write_text_atomically(out / "meta.json", seal_text(meta, indent=2))
    except BaseException:  # also Ctrl-C: never leave temp files or a new empty folder behind
        for path in tmp.values():
            path.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    return {**meta, "skipped_work": False}
