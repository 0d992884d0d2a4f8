"""`cogni-mamba verify`: check checkpoints and prepared shards against their recorded checksums."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_command

EPILOG = """PATH may be a checkpoint folder, a run folder (every complete checkpoint in it and its
`latest` pointer) or a prepared dataset folder (meta.json and its .bin shards). Each file is hashed in
full (sha256) and compared with the record written beside it; exit status 1 when anything is damaged.

examples:
  cogni-mamba verify runs/nano
  cogni-mamba verify runs/nano/step-1000 data/tinystories
"""


def add_parser(sub) -> argparse.ArgumentParser:
    p = add_command(sub, "verify", "check checkpoints and prepared data for damaged files",
                    "Check checkpoints and prepared shards against their recorded sha256 checksums.", EPILOG)
    p.add_argument("paths", nargs="+", metavar="PATH")
    return p


def check_checkpoint(ckpt: Path) -> list[str]:
    """Problems of one checkpoint folder (empty when it is whole)."""
    from ..checkpoint import MARKER, damaged_checkpoint_files, read_marker

    bad = damaged_checkpoint_files(ckpt)
    if bad:
        return [f"{ckpt / name}: does not match its recorded checksum" if name != MARKER
                else f"{ckpt / MARKER}: damaged (its own checksum does not match)" for name in bad]
    if "sha256" not in read_marker(ckpt):
        print(f"note: {ckpt} was saved without checksums (an older version); only its presence was checked")
    return []


def check_prepared(folder: Path) -> list[str]:
    from ..data.prepare import SPLITS, read_meta
    from ..errors import CogniError
    from ..integrity import sha256_file

    try:
        meta = read_meta(folder)
    except CogniError as e:
        return [str(e)]
    digests = meta.get("sha256")
    if digests is None:
        print(f"note: {folder} was prepared without checksums (an older version); only sizes were checked")
        return []
    return [f"{folder / f'{s}.bin'}: does not match the checksum in meta.json" for s in SPLITS
            if not (folder / f"{s}.bin").is_file() or sha256_file(folder / f"{s}.bin") != digests.get(f"{s}.bin")]


def check_path(path: Path) -> tuple[int, list[str]]:
    """(items checked, problems) for one PATH."""
    from ..checkpoint import MARKER, WEIGHTS, read_pointer
    from ..errors import CogniError

    if not path.exists():
        raise CogniError(f"{path} does not exist; pass a checkpoint, run or prepared data folder.")
    if (path / "meta.json").is_file() or (path / "train.bin").is_file():
        return 1, check_prepared(path)
    if (path / MARKER).is_file():
        return 1, check_checkpoint(path)
    if (path / WEIGHTS).is_file():
        return 1, [f"{path}: incomplete checkpoint (no {MARKER}: its save was interrupted)"]
    ckpts = sorted(p for p in path.iterdir() if p.is_dir() and (p / MARKER).is_file()) if path.is_dir() else []
    if not ckpts:
        raise CogniError(f"{path} holds no checkpoint and no prepared data; pass a checkpoint, run or data folder.")
    problems = [q for c in ckpts for q in check_checkpoint(c)]
    latest = read_pointer(path)
    if (path / "latest").exists() and (latest is None or not (path / latest / MARKER).is_file()):
        problems.append(f"{path / 'latest'}: does not name a complete checkpoint")
    return len(ckpts), problems


def run(args: argparse.Namespace) -> int:
    failed = False
    for raw in args.paths:
        path = Path(raw)
        n, problems = check_path(path)
        for problem in problems:
            print(f"damaged: {problem}", file=sys.stderr)
        if problems:
            failed = True
        else:
            print(f"ok: {path} ({n} {'item' if n == 1 else 'checkpoints'} checked)")
    return 1 if failed else 0
