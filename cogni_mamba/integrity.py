"""Checksums that catch silent corruption of checkpoints and prepared shards.

A checkpoint's `complete.json` and a prepared folder's `meta.json` record the sha256 of every other
file beside them, and are themselves *sealed*: they carry a sha256 of their own content, and their
exact bytes must be what this module writes, so a flipped byte anywhere, the record included, is
found. Hashing streams the files (1 MiB at a time), at about 1-2 GB/s. Setting the environment
variable `COGNI_MAMBA_NO_VERIFY=1` (or `--no-verify` where a command has it) skips the file hashes
when loading huge files; `cogni-mamba verify` always checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import CogniError

NO_VERIFY_ENV = "COGNI_MAMBA_NO_VERIFY"
SEAL = "seal"


class IntegrityError(CogniError):
    """A file does not match the checksum recorded when it was written."""


def verification_enabled() -> bool:
    return os.environ.get(NO_VERIFY_ENV, "").strip().lower() not in ("1", "true", "yes", "on")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_digests(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under root (posix relative paths, sorted), except the names in `skip`."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel not in skip:
            out[rel] = sha256_file(path)
    return out


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def seal_text(obj: dict[str, Any], *, indent: int | None = None) -> str:
    """`obj` as JSON text with a `seal` field: the sha256 of the rest, in a canonical form."""
    body = {k: v for k, v in obj.items() if k != SEAL}
    return json.dumps({**body, SEAL: hashlib.sha256(_canonical(body)).hexdigest()}, indent=indent) + "\n"


def unseal(text: str, *, indent: int | None = None) -> tuple[dict[str, Any], bool]:
    """(object without its seal, whether it was sealed); IntegrityError when the seal or the exact
    bytes do not match. Records written before checksums existed (no seal, no "sha256") pass unchecked."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"unreadable JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise IntegrityError("not a JSON object")
    if SEAL not in obj:
        if "sha256" in obj:  # records that carry checksums are always sealed: this one lost its seal
            raise IntegrityError("its own checksum is missing")
        return obj, False
    body = {k: v for k, v in obj.items() if k != SEAL}
    if obj[SEAL] != hashlib.sha256(_canonical(body)).hexdigest() or text != seal_text(body, indent=indent):
        raise IntegrityError("its content does not match its own checksum")
    return body, True


def damaged_files(root: Path, digests: dict[str, str], names: list[str] | None = None) -> list[str]:
    """The files (of `names`, default all recorded) that are missing or whose sha256 differs."""
    bad = []
    for rel in names if names is not None else list(digests):
        path = root / rel
        if rel not in digests or not path.is_file() or sha256_file(path) != digests[rel]:
            bad.append(rel)
    return bad
