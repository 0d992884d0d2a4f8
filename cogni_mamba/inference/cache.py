"""The engine's KV cache: a fixed number of slots (rows), each with its own length.

Keys and values are preallocated once: (n_layers, max_batch, n_kv_heads, max_len, head_dim). The
engine keeps its active rows compact (0..n-1) by moving the last row into a slot that is freed, so
a forward pass works on a contiguous range of rows (`view(start, stop)`), never a gather.

A view speaks the cache protocol the model uses (`positions`, `mask`, `update`, `advance`,
`max_len`): each row's new tokens go at its own length, take positions from it, and attend to its
own keys only (any stale keys a slot's earlier occupant left beyond that length are masked).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class SlotCache:
    """Keys, values and a length per slot; `view(start, stop)` is what one forward pass is given."""

    def __init__(self, config: ModelConfig, max_batch: int, max_len: int, *, device=None,
                 dtype: torch.dtype = torch.float32):
        shape = (config.n_layers, max_batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0), strict=True))  # per-layer views, made once
        self.max_len = max_len
        self.lengths = [0] * max_batch  # host copy: slicing and maxima without a device sync
        self.lengths_t = torch.zeros(max_batch, dtype=torch.long, device=device)

    @property
    def max_batch(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def view(self, start: int, stop: int) -> SlotView:
        """Rows start..stop-1 as one batch for the model."""
        return SlotView(self, start, stop)

    def reset(self, row: int) -> None:
        """Empty a slot (its old keys stay in memory but are masked from now on)."""
        self.set_length(row, 0)

    def set_length(self, row: int, length: int) -> None:
        self.lengths[row] = length
        self.lengths_t[row:row + 1].fill_(length)  # a fill; a scalar setitem waits for a GPU

    def swap_rows(self, a: int, b: int) -> None:
        """Exchange what slots a and b hold."""
        if a == b:
            return
        n = self.lengths[a]
        k, v = self.k[:, a, :, :n].clone(), self.v[:, a, :, :n].clone()
        length = self.lengths[a]
        self.copy_row(b, a)
        self.k[:, b, :, :n] = k
        self.v[:, b, :, :n] = v
        self.set_length(b, length)

    def copy_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Make slot `dst` hold what slot `src` holds (its filled part only; with `length`, its first `length`)."""
        if src == dst:
            return
        n = self.lengths[src] if length is None else length
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.set_length(dst, n)


class SlotView:
    """A contiguous range of a SlotCache's rows, as the model's cache for one forward pass."""

    def __init__(self, cache: SlotCache, start: int, stop: int):
        self.cache, self.start, self.stop = cache, start, stop
        self.k, self.v = cache.k, cache.v  # the model reads their dtype
        self.max_len = cache.max_len
        self._lengths = cache.lengths[start:stop]
        self._lengths_t = cache.lengths_t[start:stop]

    @property
    def longest(self) -> int:
        """The most slots any row of the view holds."""
        return max(self._lengths)

    def positions(self, T: int) -> torch.Tensor:
        """(B, T): each row's next T positions, from its own length."""
        if max(self._lengths) + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens per row; cannot add {T} to {max(self._lengths)}.")
        return self._lengths_t[:, None] + torch.arange(T, device=self._lengths_t.device)[None, :]

    def mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, S) boolean: each query sees its row's keys up to and including its own position.

        None when every row has the same length and plain causal masking is exact (all rows start
        empty, or one token each).
        """
        lo, hi = min(self._lengths), max(self._lengths)
        if lo == hi and (T == 1 or hi == 0):
            return None
        device = self._lengths_t.device
        q = self._lengths_t[:, None] + torch.arange(T, device=device)[None, :]  # (B, T)
        keys = torch.arange(hi + T, device=device)  # (S,)
        return (keys[None, None, :] <= q[:, :, None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, Hkv, T, D) at each row's length; return (B, Hkv, S, D) keys and values, S = longest row + T."""
        B, _, T, _ = k.shape
        keys, values = self.cache.layers[layer]
        keys, values = keys.narrow(0, self.start, B), values.narrow(0, self.start, B)  # (B, Hkv, L, D)
        if B == 1 or min(self._lengths) == max(self._lengths):
            at = self._lengths[0]
            keys.narrow(2, at, T).copy_(k)  # narrow + copy_: fewer dispatches than slice assignment
            values.narrow(2, at, T).copy_(v)
        elif T == 1:  # one token per row, each at its own length
            index = torch.arange(self.start, self.stop, device=k.device)
            self.k[layer][index, :, self._lengths_t] = k[:, :, 0]  # (B, Hkv, D) at (row, length)
            self.v[layer][index, :, self._lengths_t] = v[:, :, 0]
        else:
            for i, at in enumerate(self._lengths):
                self.k[layer, self.start + i, :, at:at + T] = k[i]
                self.v[layer, self.start + i, :, at:at + T] = v[i]
        end = max(self._lengths) + T
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, T: int) -> None:
        """Every row of the view has T more filled slots."""
        for i in range(self.start, self.stop):
            self.cache.lengths[i] += T
        self.cache.lengths_t[self.start:self.stop] += T
        self._lengths = self.cache.lengths[self.start:self.stop]
