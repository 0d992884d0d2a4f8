"""Checkpoints: the format, and everything needed to find and read one (no import of `train/`).

A checkpoint is a directory:

    model.safetensors   weights (no `_orig_mod.` / `module.` prefixes; a tied head is stored once)
    config.json         the whole Config
    tokenizer/          the tokenizer that produced the training data (when one was given)
    train_state.pt      optimizer, scaler, step, epoch, loader and RNG states (tensors and plain types only)
    complete.json       written last: a directory without it is an interrupted save and is never used;
                        it records the sha256 of every other file and is sealed (`integrity.py`), so a
                        damaged file is named when the checkpoint is loaded or `cogni-mamba verify`ed

A run directory holds checkpoints (`best/`, `epoch-N/`, `step-N/`) and `latest`, a text file naming
the newest one. Writing lives in `cogni_mamba.train.checkpoint` (training imports this module, never
the reverse), so inference (chat, serve, generate, export) loads checkpoints without the training
package. Loading never unpickles code: safetensors for weights, `torch.load(weights_only=True)` for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .config import Config, ConfigError, from_dict
from .errors import CogniError
from .integrity import IntegrityError, damaged_files, unseal, verification_enabled

MARKER = "complete.json"
LATEST = "latest"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"


class CheckpointError(CogniError):
    """A missing, incomplete, incompatible or unsafe checkpoint."""


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

def read_marker(ckpt: Path) -> dict[str, Any]:
    """complete.json, its seal checked (a CheckpointError naming the file when it is damaged)."""
    try:
        return unseal((ckpt / MARKER).read_text(encoding="utf-8"))[0]
    except (OSError, UnicodeDecodeError, IntegrityError) as e:
        raise CheckpointError(f"{ckpt / MARKER} is damaged ({e}); use another checkpoint (an earlier step-N of "
                              "the run) or save this one again.") from None


def damaged_checkpoint_files(ckpt: Path, *, skip: tuple[str, ...] = ()) -> list[str]:
    """Files of a checkpoint whose sha256 differs from complete.json's record (complete.json itself
    when its seal is broken); [] for a checkpoint saved before checksums were recorded."""
    try:
        marker = read_marker(ckpt)
    except CheckpointError:
        return [MARKER]
    digests = marker.get("sha256")
    if not isinstance(digests, dict):
        return []
    return damaged_files(ckpt, digests, [n for n in digests if n not in skip])


def verify_checkpoint(ckpt: Path, *, skip: tuple[str, ...] = ()) -> None:
    """Raise a CheckpointError naming the first damaged file (skipped with COGNI_MAMBA_NO_VERIFY=1)."""
    if not verification_enabled():
        return
    bad = damaged_checkpoint_files(ckpt, skip=skip)
    if bad:
        raise CheckpointError(f"{ckpt / bad[0]} does not match the checksum recorded when the checkpoint was saved, "
                              "so it is damaged; use another checkpoint (an earlier step-N of the run), or set "
                              "COGNI_MAMBA_NO_VERIFY=1 to load it anyway.")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP and/or torch.compile wrappers (their prefixes never reach a checkpoint)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_config_of(ckpt: Path) -> Config:
    """The Config stored beside a checkpoint's weights."""
    try:
        data = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        return from_dict(data, Config())
    except (OSError, ValueError, ConfigError) as e:
        raise CheckpointError(f"Checkpoint {ckpt} has an unreadable or incompatible config.json ({e}); "
                              "it was not written by this version of cogni-mamba.") from None


def shared_tensor_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias -> first name for state-dict entries that share memory (the tied embedding/head).

    safetensors stores each shared tensor once; the aliases are re-tied by the model's constructor.
    """
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def read_weights(ckpt: Path, expected: dict[str, torch.Tensor], aliases: dict[str, str],
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """model.safetensors as tensors, checked name by name and shape by shape against `expected`."""
    try:
        tensors = load_file(str(ckpt / WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"Checkpoint {ckpt} has unreadable weights ({e}); use another checkpoint.") from None
    missing = [k for k in expected if k not in tensors and k not in aliases]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [k for k in tensors if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise CheckpointError(f"Checkpoint {ckpt} does not match the model its config.json describes "
                              f"(first mismatched tensor: {first}); it was saved by a different model version.")
    return tensors


def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into a plain (unwrapped, unsharded) model, insisting that every tensor matches.

    Training's `cogni_mamba.train.checkpoint.load_weights` also takes DDP / compiled / FSDP2 models.
    """
    expected = model.state_dict()
    tensors = read_weights(ckpt, expected, shared_tensor_aliases(expected), device)
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t)


def load_checkpoint_full(path: str | Path, device: str | torch.device = "cpu", *,
                         prefer_best: bool = False) -> tuple[nn.Module, Any, Config]:
    """(model in eval mode, tokenizer or None, Config) from a checkpoint or run directory."""
    from .model import CogniMamba

    ckpt = find_checkpoint(path, prefer_best=prefer_best)
    verify_checkpoint(ckpt, skip=(TRAIN_STATE,))  # inference never reads the optimizer state
    config = load_config_of(ckpt)
    model = CogniMamba(config.model)
    load_weights(model, ckpt)
    model.to(device).eval()
    return model, load_tokenizer_of(ckpt, config), config


def load_tokenizer_of(ckpt: Path, config: Config) -> Any:
    """The tokenizer saved beside a checkpoint's weights (None when it has no tokenizer/ folder)."""
    if not (ckpt / "tokenizer").is_dir():
        return None
    from .tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt / "tokenizer")
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab > config.model.vocab_size:
        raise CheckpointError(f"Checkpoint {ckpt}: its tokenizer has {vocab} tokens but the model only "
                              f"{config.model.vocab_size}; the checkpoint is inconsistent.")
    return tokenizer


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", *,
                    prefer_best: bool = False) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) from a checkpoint directory, or a run directory's latest (or best)."""
    model, tokenizer, _ = load_checkpoint_full(path, device, prefer_best=prefer_best)
    return model, tokenizer
