"""Data: sources (TinyStories, CodeSearchNet, local files, registered kinds) -> `prepare` (token
shards) -> `TokenBatches` / `fixed_batches` (exact, resumable batches)."""

from .codesearchnet import codesearchnet_document
from .loader import TokenBatches, fixed_batches
from .prepare import prepare, read_meta
from .sources import Source, SourceError, SourceOptions, register_source, resolve_source

__all__ = [
    "Source", "SourceError", "SourceOptions", "TokenBatches", "codesearchnet_document", "fixed_batches",
    "prepare", "read_meta", "register_source", "resolve_source",
]
