"""Writing checkpoints (and reading what only training needs: wrapped/sharded weights, train_state.pt).

The format, finding and plain reading live in `cogni_mamba.checkpoint` (imported again here, so
`from cogni_mamba.train.checkpoint import load_checkpoint` keeps working). A checkpoint is written
into a hidden temp directory beside its final place, every file is fsynced, and the directory is
renamed into place; only then is the run's `latest` pointer (a text file naming the
directory) replaced, also atomically. A kill at any moment leaves the previous checkpoint whole.
Loading never unpickles code: safetensors for weights, `torch.load(weights_only=True)` for the rest.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .. import checkpoint as _read
from ..checkpoint import (  # noqa: F401  (the reading side, re-exported for training code)
    LATEST,
    MARKER,
    TRAIN_STATE,
    WEIGHTS,
    CheckpointError,
    _marker_step,
    find_checkpoint,
    is_complete,
    load_checkpoint,
    load_checkpoint_full,
    load_config_of,
    read_pointer,
    read_weights,
    shared_tensor_aliases,
    verify_checkpoint,
)
from ..config import Config, to_dict
from ..files import write_dir_atomically, write_text_atomically
from ..integrity import seal_text, tree_digests
from ..stats import human_bytes
from .distributed import is_sharded, load_full_model_state, tied_names, unwrap
from .preflight import free_disk

_STEP_DIR = re.compile(r"^step-(\d+)$")


# --- writing ------------------------------------------------------------------------------------

def weights_for_saving(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                       ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state dict (or `state`, e.g. FSDP's gathered weights) with each shared tensor kept
    once, plus a map alias -> kept name.

    safetensors refuses tensors that share memory (the tied embedding/head), so aliases are dropped
    here and re-tied by the model's constructor on load.
    """
    state = unwrap(model).state_dict() if state is None else state
    aliases = shared_tensor_aliases(state)
    kept = {name: t.detach().to("cpu").contiguous() for name, t in state.items() if name not in aliases}
    return kept, aliases


def write_pointer(run_dir: Path, name: str, pointer: str = LATEST) -> None:
    """Atomically make the text file `run_dir/pointer` name the checkpoint directory `name`."""
    write_text_atomically(run_dir / pointer, name + "\n")


def save_checkpoint(run_dir: str | Path, name: str, model: nn.Module, config: Config, *, tokenizer: Any = None,
                    train_state: dict | None = None, info: dict | None = None, update_latest: bool = True,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `run_dir/name` atomically and (by default) point `latest` at it.

    `weights` replaces `model.state_dict()` (an FSDP model's full weights, gathered beforehand).
    """
    run_dir = Path(run_dir)

    def fill(tmp: Path) -> None:
        tensors, aliases = weights_for_saving(model, weights)
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "aliases": json.dumps(aliases)})
        except SafetensorError as e:  # safetensors reports a failed write (a full disk) as its own error
            raise _write_error(e, tmp / WEIGHTS) from None
        (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer")
        if train_state is not None:
            try:
                torch.save(train_state, tmp / TRAIN_STATE)
            except RuntimeError as e:  # torch's zip writer reports a failed write as a RuntimeError
                if "writ" not in str(e):
                    raise
                raise _write_error(e, tmp / TRAIN_STATE) from None
        marker = {"format": 1, **(info or {}), "sha256": tree_digests(tmp)}
        (tmp / MARKER).write_text(seal_text(marker), encoding="utf-8")

    final = write_dir_atomically(run_dir / name, fill)  # fsynced, then renamed into place
    if update_latest:
        write_pointer(run_dir, name)
    return final


def _write_error(e: Exception, path: Path) -> OSError:
    """A library's failed write as an OSError, with the errno it names ("os error 28": ENOSPC)."""
    m = re.search(r"os error (\d+)", str(e))
    code = int(m.group(1)) if m else (errno.ENOSPC if shutil.disk_usage(path.parent).free == 0 else errno.EIO)
    return OSError(code, os.strerror(code), str(path))


def link_checkpoint(run_dir: str | Path, src: str, dst: str) -> Path:
    """Publish an existing checkpoint under another name (`best`, `epoch-N`) with hard links.

    Checkpoint files are never modified after they are written, so sharing them is safe; where hard
    links are not possible the files are copied.
    """
    run_dir = Path(run_dir)

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    write_dir_atomically(run_dir / dst, lambda tmp: shutil.copytree(run_dir / src, tmp, copy_function=link_or_copy,
                                                                      dirs_exist_ok=True))
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
        if p.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


# --- reading ------------------------------------------------------------------------------------

def load_weights(model: nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors into `model` (wrapped by DDP / torch.compile, or sharded by FSDP2)."""
    verify_checkpoint(ckpt)  # weights, config, tokenizer and the training state
    target = unwrap(model)
    if not is_sharded(target):
        _read.load_weights(target, ckpt, device)
        return
    aliases = tied_names(target)
    tensors = read_weights(ckpt, target.state_dict(), aliases, device)
    # each rank keeps its shard of the full tensors
    load_full_model_state(target, {**tensors, **{a: tensors[k] for a, k in aliases.items()}})


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


def save_failure_message(run_dir: Path, step: int, error: OSError | None) -> str:
    """One sentence on a failed save: what happened, what is intact, how to go on (None: rank 0's error)."""
    if error is None:
        return f"Rank 0 could not save the checkpoint at step {step}; see its message."
    latest = read_pointer(run_dir)
    reason = error.strerror or str(error)
    kept = (f"the last good checkpoint ({run_dir / latest}) is intact, so free some space and continue "
            "from it with --resume" if latest else "no earlier checkpoint exists, so free some space and start again")
    try:
        free = f", {human_bytes(free_disk(run_dir))} free"
    except OSError:
        free = ""
    return f"Could not save the checkpoint at step {step} in {run_dir} ({reason}{free}); {kept}."
