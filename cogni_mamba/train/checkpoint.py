"""The one save/load path for checkpoints.

A checkpoint is a directory:

    model.safetensors   weights (no `_orig_mod.` / `module.` prefixes; a tied head is stored once)
    config.json         the whole Config
    tokenizer/          the tokenizer that produced the training data (when one was given)
    train_state.pt      optimizer, scaler, step, epoch, loader and RNG states (tensors and plain types only)
    complete.json       written last: a directory without it is an interrupted save and is never used

It is written into a hidden temp directory beside its final place, every file is fsynced, and the
directory is renamed into place; only then is the run's `latest` pointer (a text file naming the
directory) replaced, also atomically. A kill at any moment leaves the previous checkpoint whole.
Loading never unpickles code: safetensors for weights, `torch.load(weights_only=True)` for the rest.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config, ConfigError, from_dict, to_dict
from ..errors import CogniError
from .distributed import is_sharded, load_full_model_state, tied_names, unwrap

MARKER = "complete.json"
LATEST = "latest"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(CogniError):
    """A missing, incomplete, incompatible or unsafe checkpoint."""


# --- writing ------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry list) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still orders writes
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def weights_for_saving(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict (or `state`, e.g. FSDP's gathered weights) with each shared tensor kept
    once, plus a map alias -> kept name.

    safetensors refuses tensors that share memory (the tied embedding/head), so aliases are dropped
    here and re-tied by the model's constructor on load.
    """
    state = unwrap(model).state_dict() if state is None else state
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = t.detach().to("cpu").contiguous()
    return kept, aliases


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir to `final`, replacing an existing directory of that name."""
    trash = None
    if final.exists():
        trash = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_pointer(run_dir: Path, name: str, pointer: str = LATEST) -> None:
    """Atomically make the text file `run_dir/pointer` name the checkpoint directory `name`."""
    tmp = run_dir / f".{pointer}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / pointer)
    _fsync(run_dir)


def save_checkpoint(run_dir: str | Path, name: str, model: nn.Module, config: Config, *, tokenizer: Any = None,
                    train_state: dict | None = None, info: dict | None = None, update_latest: bool = True,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `run_dir/name` atomically and (by default) point `latest` at it.

    `weights` replaces `model.state_dict()` (an FSDP model's full weights, gathered beforehand).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors, aliases = weights_for_saving(model, weights)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        if train_state is not None:
            torch.save(train_state, tmp / TRAIN_STATE)
        _fsync_tree(tmp)
        marker = {"format": 1, **(info or {})}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        _fsync(tmp / MARKER)
        _fsync(tmp)
        final = run_dir / name
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_latest:
        write_pointer(run_dir, name)
    return final


def link_checkpoint(run_dir: str | Path, src: str, dst: str) -> Path:
    """Publish an existing checkpoint under another name (`best`, `epoch-N`) with hard links.

    Checkpoint files are never modified after they are written, so sharing them is safe; where hard
    links are not possible the files are copied.
    """
    run_dir = Path(run_dir)
    tmp = run_dir / f".tmp-{dst}-{uuid.uuid4().hex[:8]}"

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    try:
        shutil.copytree(run_dir / src, tmp, copy_function=link_or_copy)
        _fsync_tree(tmp)
        _replace_dir(tmp, run_dir / dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir / dst


def prune_step_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step-N directories (never the one `latest` names)."""
    run_dir = Path(run_dir)
    current = read_pointer(run_dir)
    steps = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                   if (m := _STEP_DIR.match(p.name)) and p.is_dir())
    for _, path in steps[:-keep_last] if keep_last > 0 else steps:
        if path.name != current:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temps(run_dir: str | Path) -> None:
    """Remove temp directories left behind by a save that was killed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# --- finding ------------------------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    """True for a checkpoint directory whose save finished."""
    return (path / MARKER).is_file() and (path / WEIGHTS).is_file() and (path / "config.json").is_file()


def read_pointer(run_dir: Path, pointer: str = LATEST) -> str | None:
    """The directory name a pointer file holds, or None."""
    try:
        name = (run_dir / pointer).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and "/" not in name and name not in (".", "..") else None


def _marker_step(path: Path) -> int:
    try:
        return int(json.loads((path / MARKER).read_text(encoding="utf-8")).get("step", -1))
    except (OSError, ValueError, AttributeError):
        return -1


def find_checkpoint(path: str | Path, *, prefer_best: bool = False) -> Path:
    """The checkpoint directory meant by `path`: itself, or in a run directory `best`/`latest`.

    In a run directory `latest` is followed when it names a complete checkpoint; otherwise the
    complete checkpoint with the highest step is taken. Incomplete directories are never chosen.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint path {path} does not exist; pass a checkpoint or run directory "
                              "written by `cogni-mamba train`.")
    if is_complete(path):
        return path
    if (path / WEIGHTS).exists():
        raise CheckpointError(f"Checkpoint {path} is incomplete (its save was interrupted); "
                              "use an earlier checkpoint or the run directory.")
    if path.is_dir():
        if prefer_best and is_complete(path / "best"):
            return path / "best"
        name = read_pointer(path)
        if name and is_complete(path / name):
            return path / name
        candidates = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and is_complete(p)]
        if candidates:
            return max(candidates, key=lambda p: (_marker_step(p), p.name != "best", p.stat().st_mtime))
    raise CheckpointError(f"No complete checkpoint found in {path}; train one with `cogni-mamba train` "
                          "or pass a checkpoint directory.")


# --- reading ------------------------------------------------------------------------------------

def load_config_of(ckpt: Path) -> Config:
    """The Config stored beside a checkpoint's weights."""
    try:
        data = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        return from_dict(data, Config())
    except (OSError, ValueError, ConfigError) as e:
        raise CheckpointError(f"Checkpoint {ckpt} has an unreadable or incompatible config.json ({e}); "
                              "it was not written by this version of cogni-mamba.") from None


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` (unwrapped, or sharded by FSDP2), insisting that every tensor matches."""
    try:
        tensors = load_file(str(ckpt / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Checkpoint {ckpt} has unreadable weights ({e}); use another checkpoint.") from None
    target = unwrap(model)
    expected = target.state_dict()
    aliases = tied_names(target) if is_sharded(target) else weights_for_saving(target)[1]
    missing = [k for k in expected if k not in tensors and k not in aliases]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise CheckpointError(f"Checkpoint {ckpt} does not match the model its config.json describes "
                              f"(first mismatched tensor: {first}); it was saved by a different model version.")
    if is_sharded(target):  # each rank keeps its shard of the full tensors
        load_full_model_state(target, {**tensors, **{a: tensors[k] for a, k in aliases.items()}})
        return
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t)


def load_train_state(ckpt: Path) -> dict:
    """train_state.pt, loaded without ever running pickled code."""
    path = ckpt / TRAIN_STATE
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {ckpt} has no {TRAIN_STATE}, so training cannot resume from it; "
                              "start a new run instead of --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"Refusing {path}: it holds objects other than tensors and plain values "
                              f"({first_line[:160]}); only load checkpoints you trust.") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a cogni-mamba training state; start a new run instead of --resume.")
    return state


def load_checkpoint_full(path: str | Path, device: str | torch.device = "cpu", *,
                         prefer_best: bool = False) -> tuple[nn.Module, Any, Config]:
    """(model in eval mode, tokenizer or None, Config) from a checkpoint or run directory."""
    from ..model import CogniMamba

    ckpt = find_checkpoint(path, prefer_best=prefer_best)
    config = load_config_of(ckpt)
    model = CogniMamba(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    tokenizer = None
    if (ckpt / "tokenizer").is_dir():
        from ..tokenizer import load_tokenizer

        tokenizer = load_tokenizer(ckpt / "tokenizer")
        vocab = getattr(tokenizer, "vocab_size", None)
        if vocab is not None and vocab > config.model.vocab_size:
            raise CheckpointError(f"Checkpoint {ckpt}: its tokenizer has {vocab} tokens but the model only "
                                  f"{config.model.vocab_size}; the checkpoint is inconsistent.")
    return model, tokenizer, config


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                    prefer_best: bool = False) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a checkpoint directory, or a run directory's latest (or best)."""
    model, tokenizer, _ = load_checkpoint_full(path, device, prefer_best=prefer_best)
    return model, tokenizer
