"""Prepared shards -> exact, resumable (x, y) batches.

A dataset split of N tokens holds W = (N - 1) // T windows: window w is tokens [w*T, w*T + T + 1), so
windows do not overlap and each token is predicted once per epoch (x = window[:-1], y = window[1:]).

Each dataset is read as an endless stream of its windows: epoch e is a permutation of all W windows
drawn from (seed, dataset, e), and epoch e+1 follows it. Global batch k has B * world_size slots; each
slot takes the next window of a dataset's stream (which dataset: a draw from (seed, k) by weight, the
same on every rank), and rank r gets slots [r*B, (r+1)*B). So every window of an epoch is used exactly
once across all ranks (the last batch of an epoch runs on into the next one instead of dropping
windows), ranks never share a window, and the state is just the batch counter and one cursor per
dataset: a resumed loader continues with exactly the batch that would have come next.

For a mixture, an "epoch" (`.epoch`, `.batches_per_epoch`) is as many windows as all datasets hold
together; each dataset cycles through its own epochs at the rate its weight sets.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import CogniError
from .prepare import read_meta, verify_shard

STATE_VERSION = 1
_MIX_STREAM = 0x6D6978  # separates the mixture draws from the permutations under one seed


class _Split:
    """One prepared dataset's split as a memmap, cut into windows of seq_len + 1 tokens."""

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int):
        self.meta = read_meta(data_dir)
        if split not in self.meta["splits"]:
            raise CogniError(f"Unknown split {split!r}; use one of: {', '.join(self.meta['splits'])}.")
        n_tokens = self.meta["splits"][split]["tokens"]
        path = Path(data_dir) / f"{split}.bin"
        if not path.is_file() or path.stat().st_size != n_tokens * np.dtype(self.meta["dtype"]).itemsize:
            raise CogniError(f"{path} is missing or does not match meta.json; re-run `cogni-mamba prepare --force`.")
        verify_shard(data_dir, split, self.meta)
        self.n_windows = max(0, (n_tokens - 1) // seq_len)
        if self.n_windows == 0:
            raise CogniError(f"{data_dir} has only {n_tokens} {split} tokens, fewer than seq_len + 1 = "
                             f"{seq_len + 1}; use a shorter seq_len or more data.")
        self.tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r")
        self.seq_len = seq_len

    def windows(self, ids: np.ndarray) -> np.ndarray:
        """The windows with these ids, (n, T + 1) int64."""
        offsets = ids.astype(np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (n, T+1)
        return self.tokens[offsets].astype(np.int64)


def _to_xy(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    rows_t = torch.from_numpy(rows)  # (B, T+1)
    return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()  # (B, T), (B, T)


def _open_splits(data_dirs, split: str, seq_len: int) -> list[_Split]:
    if isinstance(data_dirs, str | os.PathLike):
        data_dirs = [data_dirs]
    if not data_dirs:
        raise CogniError("No data folders given; prepare one with `cogni-mamba prepare` and pass it.")
    if seq_len <= 0:
        raise CogniError(f"seq_len must be positive, got {seq_len}.")
    splits = [_Split(d, split, seq_len) for d in data_dirs]
    fingerprints = {s.meta["tokenizer_fingerprint"] for s in splits}
    if len(fingerprints) > 1:
        raise CogniError("The data folders were prepared with different tokenizers; prepare them all "
                         "with the same one (their token ids do not mean the same thing).")
    return splits


class TokenBatches:
    """Endless iterator of (x, y) int64 batches (B, T), shuffled per epoch, resumable, DDP-aware."""

    def __init__(self, data_dirs, seq_len: int, batch_size: int, *, weights=None, seed: int = 1337,
                 split: str = "train", rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise CogniError(f"batch_size must be positive, got {batch_size}.")
        if not 0 <= rank < world_size:
            raise CogniError(f"rank {rank} is outside 0..{world_size - 1} (world_size {world_size}).")
        self.datasets = _open_splits(data_dirs, split, seq_len)
        self.weights = self._normalised(weights)
        self.seq_len, self.batch_size, self.seed, self.split = seq_len, batch_size, seed, split
        self.rank, self.world_size = rank, world_size
        self.slots = batch_size * world_size  # windows per global batch
        self.windows_per_epoch = sum(d.n_windows for d in self.datasets)
        self.batches_per_epoch = math.ceil(self.windows_per_epoch / self.slots)  # per rank
        self.batches_done = 0
        self.cursors = [0] * len(self.datasets)  # windows consumed from each dataset's stream
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _normalised(self, weights) -> np.ndarray:
        n = len(self.datasets)
        if weights is None or len(weights) == 0:
            return np.full(n, 1.0 / n)
        if len(weights) != n or any(w <= 0 for w in weights):
            raise CogniError(f"Give one positive weight per data folder ({n}), got {list(weights)}.")
        w = np.asarray(weights, dtype=np.float64)
        return w / w.sum()

    @property
    def epoch(self) -> int:
        """The current epoch, 0-based."""
        return self.batches_done // self.batches_per_epoch

    def __iter__(self):
        return self

    def _permutation(self, i: int, epoch: int) -> np.ndarray:
        key = (i, epoch)
        if key not in self._perms:
            if len(self._perms) >= 2 * len(self.datasets):  # keep only the recent epochs
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.default_rng([self.seed, i, epoch])
            self._perms[key] = rng.permutation(self.datasets[i].n_windows)
        return self._perms[key]

    def _take(self, i: int, count: int) -> np.ndarray:
        """The next `count` window ids of dataset i's stream; advances its cursor."""
        n, out = self.datasets[i].n_windows, []
        while count > 0:
            epoch, pos = divmod(self.cursors[i], n)
            got = self._permutation(i, epoch)[pos: pos + count]
            out.append(got)
            self.cursors[i] += len(got)
            count -= len(got)
        return np.concatenate(out) if out else np.empty(0, dtype=np.int64)

    def _slot_datasets(self, k: int) -> np.ndarray:
        """Which dataset fills each slot of global batch k (the same on every rank)."""
        if len(self.datasets) == 1:
            return np.zeros(self.slots, dtype=np.int64)
        rng = np.random.default_rng([self.seed, _MIX_STREAM, k])
        return rng.choice(len(self.datasets), size=self.slots, p=self.weights)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        which = self._slot_datasets(self.batches_done)  # (B * world_size,)
        ids = np.empty(self.slots, dtype=np.int64)
        for i in range(len(self.datasets)):
            at = np.flatnonzero(which == i)
            ids[at] = self._take(i, len(at))  # every rank advances every cursor alike
        self.batches_done += 1
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)  # (B, T+1)
        for i in np.unique(which[mine]):
            at = np.flatnonzero(which[mine] == i)
            rows[at] = self.datasets[i].windows(ids[mine][at])
        return _to_xy(rows)

    def _identity(self) -> dict:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "world_size": self.world_size,
                "seed": self.seed, "split": self.split, "n_windows": [d.n_windows for d in self.datasets],
                "weights": [float(w) for w in self.weights]}

    def state_dict(self) -> dict:
        """Plain ints, floats, strings and lists (saves with torch.save, loads with weights_only=True)."""
        return {"version": STATE_VERSION, "batches_done": self.batches_done, "cursors": list(self.cursors),
                **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state: the next batch is the one that would have followed it."""
        if state.get("version") != STATE_VERSION:
            raise CogniError(f"Loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                             "it was saved by another version of cogni-mamba.")
        mine = self._identity()
        changed = [k for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise CogniError(f"The saved loader state does not match this data loader ({', '.join(changed)} "
                             "differ); resume with the same data, seq_len, batch size, seed and world size.")
        self.batches_done = int(state["batches_done"])
        self.cursors = [int(c) for c in state["cursors"]]


def fixed_batches(data_dirs, seq_len: int, batch_size: int, n: int, split: str = "val"
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches of an unshuffled pass (datasets taking turns batch by batch); same every call.

    Only full batches are used, except that a dataset with fewer than batch_size windows gives one
    smaller batch, so a tiny val split can still be evaluated.
    """
    per_dataset = []
    for d in _open_splits(data_dirs, split, seq_len):
        starts = range(0, max(1, d.n_windows - batch_size + 1), batch_size)
        per_dataset.append([(d, np.arange(s, min(s + batch_size, d.n_windows))) for s in starts])
    batches = []
    for turn in range(max(len(p) for p in per_dataset)):
        batches += [p[turn] for p in per_dataset if turn < len(p)]
    return [_to_xy(d.windows(ids)) for d, ids in batches[:n]]
