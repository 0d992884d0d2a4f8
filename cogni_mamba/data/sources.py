"""Document sources: each one yields the documents (strings) of a corpus, one at a time.

A source is named on the command line by a spec; `SOURCE_SPEC_HELP` lists the forms.

Decisions: bytes that are not valid UTF-8 are replaced by U+FFFD and counted (`replaced` in
meta.json), so one bad byte never stops a long run; documents that are empty or whitespace only are
skipped and counted (`skipped`).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CogniError
from .codesearchnet import codesearchnet_document

TINYSTORIES_HUB = "roneneldan/TinyStories"
CODESEARCHNET_HUB = "code-search-net/code_search_net"
TINYSTORIES_SEPARATOR = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
_REPLACEMENT = "\ufffd".encode()

SOURCE_SPEC_HELP = """\
    tinystories                    the hub dataset roneneldan/TinyStories (train + validation)
    tinystories:PATH               a local TinyStories .txt (stories split on <|endoftext|>), .jsonl or
                                   .parquet with a `text` field, or a folder of these
    codesearchnet                  the hub CodeSearchNet Python subset
    codesearchnet:PATH             local CodeSearchNet .jsonl / .jsonl.gz files (original schema) or a folder
    files:PATH  (or just PATH)     local .txt (one document per file, or split on --separator),
                                   .jsonl / .jsonl.gz / .parquet (text in --field), or a folder of these
    hub:NAME[:CONFIG]              any hub dataset with a text field (--field), all of its splits
    KIND[:ARG]                     a kind added with `register_source` (the built-in demo corpus)
"""


class SourceError(CogniError):
    """A source that cannot be read: missing path, empty file, wrong schema, hub unreachable."""


@dataclass
class ReadStats:
    """Counters a source updates while it reads; `on_bytes` drives the progress bar."""

    bytes_read: int = 0
    replaced: int = 0  # invalid UTF-8 sequences replaced by U+FFFD
    skipped: int = 0  # empty or whitespace-only documents
    on_bytes: Callable[[int], None] = field(default=lambda n: None, repr=False)

    def advance(self, n: int) -> None:
        self.bytes_read += n
        self.on_bytes(n)


@dataclass(frozen=True)
class SourceOptions:
    """Settings for local files: the jsonl/parquet text field and the .txt separator (None: whole file)."""

    field: str = "text"
    separator: str | None = None


@dataclass(frozen=True)
class Source:
    """A corpus: `read(stats)` yields its documents; `key` identifies the inputs for re-run detection."""

    description: str
    key: tuple
    read: Callable[[ReadStats], Iterator[str]]
    total_bytes: int | None = None  # for the progress bar's ETA (None: unknown)


# --- decoding and plain-file readers ----------------------------------------------------------

def decode_utf8(data: bytes, stats: ReadStats) -> str:
    """Decode UTF-8; invalid sequences become U+FFFD and are counted in stats.replaced."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # U+FFFD characters that were already in the file are not replacements.
        stats.replaced += text.count("\ufffd") - data.count(_REPLACEMENT)
        return text


def _keep(doc: str, stats: ReadStats) -> bool:
    if doc.strip():
        return True
    stats.skipped += 1
    return False


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _split_stream(f, separator: bytes, block: int = 1 << 23) -> Iterator[bytes]:
    """The pieces of a binary file between separators, read in blocks so big files need little memory."""
    tail = b""
    while data := f.read(block):
        pieces = (tail + data).split(separator)
        tail = pieces.pop()
        yield from pieces
    yield tail


def read_txt(path: Path, separator: str | None, stats: ReadStats) -> Iterator[str]:
    """Documents of a .txt file: the whole file, or its pieces between separators (stripped)."""
    with open(path, "rb") as f:
        pieces = [f.read()] if separator is None else _split_stream(f, separator.encode())
        sep_len = len(separator.encode()) if separator else 0
        previous = None
        # One piece behind, so that the blank tail after a final separator is not counted as skipped.
        for raw in pieces:
            if previous is not None:
                doc = decode_utf8(previous, stats).strip()
                if _keep(doc, stats):
                    yield doc
            stats.advance(len(raw) + (sep_len if previous is not None else 0))  # + the separator before it
            previous = raw
        doc = decode_utf8(previous or b"", stats).strip()
        if (doc or separator is None) and _keep(doc, stats):
            yield doc


def iter_jsonl(path: Path, stats: ReadStats) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a .jsonl or .jsonl.gz file."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            stats.advance(len(raw))
            line = decode_utf8(raw, stats).strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}:{lineno} is not valid JSON ({e.msg}); "
                                  "each line of a .jsonl file must be one JSON object.") from None
            if not isinstance(record, dict):
                raise SourceError(f"{path}:{lineno} is not a JSON object; each line must be an object "
                                  "with the text in a field.")
            yield lineno, record


def require_field(record: dict, name: str, where: str) -> str:
    """record[name] as a string, or a SourceError naming the missing field."""
    if name not in record:
        fields = ", ".join(sorted(record)) or "none"
        raise SourceError(f"{where} has no field {name!r} (fields: {fields}); "
                          f"pass the right one with --field or fix the file.")
    value = record[name]
    return "" if value is None else str(value)


def read_jsonl(path: Path, field_name: str, stats: ReadStats) -> Iterator[str]:
    """Documents in field `field_name` of each line of a .jsonl / .jsonl.gz file."""
    for lineno, record in iter_jsonl(path, stats):
        doc = require_field(record, field_name, f"{path}:{lineno}").strip()
        if _keep(doc, stats):
            yield doc


def read_parquet(path: Path, field_name: str, stats: ReadStats) -> Iterator[str]:
    """Documents in column `field_name` of a .parquet file, read one row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("Reading .parquet files needs pyarrow; install it with "
                          "`pip install 'cogni-mamba[data]'`.") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise SourceError(f"{path} is not a readable parquet file ({e}).") from None
    columns = pf.schema_arrow.names
    if field_name not in columns:
        raise SourceError(f"{path} has no column {field_name!r} (columns: {', '.join(columns)}); "
                          "pass the right one with --field.")
    size, rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    for i in range(pf.num_row_groups):
        table = pf.read_row_group(i, columns=[field_name])
        for value in table.column(0).to_pylist():
            doc = "" if value is None else str(value).strip()
            if _keep(doc, stats):
                yield doc
        stats.advance(size * table.num_rows // rows)  # progress in file bytes, pro rata


# --- local paths ------------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    return next((s for s in TEXT_SUFFIXES if path.name.endswith(s)), "")


def list_files(path: str, suffixes: Iterable[str]) -> list[Path]:
    """The files a path names: itself, or every matching file below a folder (sorted, non-empty)."""
    p = Path(path).expanduser()
    suffixes = tuple(suffixes)
    if not p.exists():
        raise SourceError(f"{path} does not exist; check the path given to --source.")
    if p.is_file():
        if not p.name.endswith(suffixes):
            raise SourceError(f"{path} is not a {' / '.join(suffixes)} file; use one of those formats.")
        if p.stat().st_size == 0:
            raise SourceError(f"{path} is empty; give a file with documents in it.")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    files = [f for f in files if f.stat().st_size > 0]  # empty files in a folder hold no documents
    if not files:
        raise SourceError(f"{path} holds no non-empty {' / '.join(suffixes)} files; "
                          "point --source at a folder or file with documents.")
    return files


def _files_key(kind: str, files: list[Path], options: SourceOptions) -> tuple:
    # Path, size and modification time identify a file's content without reading it again.
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return (kind, options.field, options.separator, tuple(stats))


def files_source(path: str, options: SourceOptions, *, kind: str = "files") -> Source:
    """Local .txt / .jsonl / .jsonl.gz / .parquet files or a folder of them."""
    files = list_files(path, TEXT_SUFFIXES)

    def read(stats: ReadStats) -> Iterator[str]:
        for f in files:
            suffix = _suffix(f)
            if suffix == ".txt":
                yield from read_txt(f, options.separator, stats)
            elif suffix == ".parquet":
                yield from read_parquet(f, options.field, stats)
            else:
                yield from read_jsonl(f, options.field, stats)

    return Source(f"{kind}:{path}", _files_key(kind, files, options), read,
                  sum(f.stat().st_size for f in files))


# --- the hub ----------------------------------------------------------------------------------

def _offline_error(name: str, local_hint: str, cause: Exception) -> SourceError:
    return SourceError(
        f"Could not load {name} from the Hugging Face hub (offline or unreachable: "
        f"{type(cause).__name__}); download it elsewhere and pass the local files instead, "
        f"e.g. --source {local_hint} (a copy already in the cache loads with HF_HUB_OFFLINE=1).")


def load_hub(name: str, config: str | None, local_hint: str, **kwargs):
    """A hub dataset as a DatasetDict of all its splits, or a SourceError that says how to go local."""
    try:
        import datasets
    except ImportError:
        raise SourceError(f"Loading {name} from the hub needs the `datasets` package; install it with "
                          f"`pip install 'cogni-mamba[data]'` or pass local files, e.g. "
                          f"--source {local_hint}.") from None
    try:
        return datasets.load_dataset(name, config, **kwargs)
    except Exception as e:  # offline, DNS, HTTP and cache errors all mean the same to the user
        raise _offline_error(name, local_hint, e) from None


def hub_source(name: str, config: str | None, to_doc: Callable[[dict], str], *, local_hint: str,
               columns: list[str], **kwargs) -> Source:
    """Every split of a hub dataset, in split-name order; `to_doc` turns a row into a document.

    The dataset is downloaded (or found in the cache) here, so an offline hub fails before any work.
    """
    splits = {k: v.select_columns(columns) for k, v in _checked_splits(name, config, local_hint, columns,
                                                                         **kwargs).items()}

    def read(stats: ReadStats) -> Iterator[str]:
        for split in sorted(splits):
            for batch in splits[split].iter(batch_size=1000):
                for values in zip(*(batch[c] for c in columns), strict=True):
                    doc = to_doc(dict(zip(columns, values, strict=True))).strip()
                    stats.advance(len(doc.encode()))
                    if _keep(doc, stats):
                        yield doc

    # The datasets fingerprint changes with the data, so a new hub revision re-prepares.
    key = ("hub", name, config, tuple(columns), tuple(sorted(kwargs.items())),
           tuple((k, v._fingerprint) for k, v in sorted(splits.items())))
    total = sum(v.data.nbytes for v in splits.values())  # about the text's size, for the ETA
    return Source(f"hub:{name}" + (f":{config}" if config else ""), key, read, total)


def _checked_splits(name: str, config: str | None, local_hint: str, columns: list[str], **kwargs) -> dict:
    splits = load_hub(name, config, local_hint, **kwargs)
    for split, ds in splits.items():
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise SourceError(f"{name} split {split!r} has no field {missing[0]!r} "
                              f"(fields: {', '.join(ds.column_names)}); pass the right one with --field.")
    return dict(splits)


# --- the registry -----------------------------------------------------------------------------

SourceFactory = Callable[[str | None, SourceOptions], Source]
_REGISTRY: dict[str, SourceFactory] = {}


def register_source(kind: str, factory: SourceFactory) -> None:
    """Make `--source KIND[:ARG]` resolve to `factory(ARG or None, options)` (e.g. the demo corpus)."""
    _REGISTRY[kind] = factory


def source_kinds() -> list[str]:
    """The registered source kinds, sorted."""
    return sorted(_REGISTRY)


def resolve_source(spec: str, options: SourceOptions | None = None) -> Source:
    """A Source from a spec such as `tinystories`, `tinystories:/data/ts.txt`, `files:docs/` or `docs/`."""
    options = options or SourceOptions()
    kind, sep, arg = spec.partition(":")
    if kind in _REGISTRY:
        return _REGISTRY[kind](arg if sep else None, options)
    if os.path.exists(spec) or os.sep in spec or "." in spec:
        return files_source(spec, options)  # a bare path means files:PATH
    raise SourceError(f"Unknown source {spec!r}; use a path or one of: {', '.join(source_kinds())} "
                      "(see `cogni-mamba prepare --help`).")


def _tinystories(arg: str | None, options: SourceOptions) -> Source:
    if arg is None:
        return hub_source(TINYSTORIES_HUB, None, lambda r: r["text"], columns=["text"],
                          local_hint="tinystories:/path/to/TinyStories-train.txt")
    # The original .txt separates stories with <|endoftext|>; jsonl/parquet keep one per record.
    local = SourceOptions(field=options.field, separator=TINYSTORIES_SEPARATOR)
    return files_source(arg, local, kind="tinystories")


def _codesearchnet_row(row: dict) -> str:
    return codesearchnet_document(row["func_name"], row["func_documentation_string"], row["func_code_string"])


def _codesearchnet(arg: str | None, options: SourceOptions) -> Source:
    if arg is None:
        # datasets >= 4 runs no loading scripts; the hub's parquet export holds the same rows.
        return hub_source(CODESEARCHNET_HUB, "python", _codesearchnet_row,
                          columns=["func_name", "func_documentation_string", "func_code_string"],
                          local_hint="codesearchnet:/path/to/python/final/jsonl",
                          revision="refs/convert/parquet")
    files = list_files(arg, (".jsonl", ".jsonl.gz"))

    def read(stats: ReadStats) -> Iterator[str]:
        for f in files:
            for lineno, record in iter_jsonl(f, stats):
                where = f"{f}:{lineno}"
                doc = codesearchnet_document(*(require_field(record, k, where)
                                               for k in ("func_name", "docstring", "code")))
                if _keep(doc, stats):
                    yield doc

    return Source(f"codesearchnet:{arg}", _files_key("codesearchnet", files, options), read,
                  sum(f.stat().st_size for f in files))


def _hub(arg: str | None, options: SourceOptions) -> Source:
    if not arg:
        raise SourceError("The hub source needs a dataset name, e.g. --source hub:roneneldan/TinyStories.")
    name, _, config = arg.partition(":")
    return hub_source(name, config or None, lambda r: r[options.field], columns=[options.field],
                      local_hint=f"files:/path/to/{name.split('/')[-1]}.jsonl")


register_source("tinystories", _tinystories)
register_source("codesearchnet", _codesearchnet)
def _files(arg: str | None, options: SourceOptions) -> Source:
    if not arg:
        raise SourceError("The files source needs a path, e.g. --source files:/path/to/texts/.")
    return files_source(arg, options)


def _builtin(arg: str | None, options: SourceOptions) -> Source:
    """The demo's generated corpus, `builtin[:size=4M,seed=1,...]`. The corpus package is imported here, when the
    source is used: it knows nothing of this module, and the data package does not load it until then."""
    from ..corpus import corpus_documents, parse_spec

    spec = parse_spec(arg)

    def read(stats: ReadStats) -> Iterator[str]:
        for doc in corpus_documents(spec):
            stats.advance(len(doc.encode("utf-8")))
            yield doc

    return Source(f"builtin:{arg or ''}".rstrip(":"), spec.key(), read, spec.size)


register_source("files", _files)
register_source("hub", _hub)
register_source("builtin", _builtin)
