"""Atomic file and folder writes: the one way this project writes anything a reader may see.

Each helper writes into a hidden temp name beside the target, flushes it to disk, and renames it
into place, so a kill, a full disk or an exception at any moment leaves either the old content or
the new one, never half of it, and no temp file behind. Directories are swapped the same way (the
old one moved aside first, then removed).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file (or a directory's entry list) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still orders writes
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def _temp_name(path: Path, kind: str) -> Path:
    return path.parent / f".{kind}-{path.name}-{uuid.uuid4().hex[:8]}"


def write_file_atomically(path: str | Path, fill: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Call fill(temp path), then rename the temp file to `path` (its folder must exist or is made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "tmp")
    try:
        fill(tmp)
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str, *, fsync: bool = True) -> Path:
    """`path` holds exactly `text` (UTF-8, "\\n" line ends), or its old content if anything failed."""
    def fill(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    return write_file_atomically(path, fill, fsync=fsync)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp folder to `final`, replacing an existing file or folder of that name."""
    old = None
    if final.exists():
        old = _temp_name(final, "old")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_dir_atomically(out: str | Path, fill: Callable[[Path], None], *, fsync: bool = True) -> Path:
    """Call fill(temp folder) on a hidden folder beside `out`, flush it, then swap it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out, "tmp")
    tmp.mkdir()
    try:
        fill(tmp)
        if fsync:
            fsync_tree(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
