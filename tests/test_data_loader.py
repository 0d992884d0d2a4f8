"""TokenBatches / fixed_batches on shards whose token values name their own positions (ids = offset)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cogni_mamba.data import TokenBatches, fixed_batches
from cogni_mamba.errors import CogniError


def make_prepared(folder: Path, train: np.ndarray, val: np.ndarray | None = None, *,
                  fingerprint: str = "test") -> Path:
    """A prepared folder written by hand in the documented format (independent of prepare())."""
    val = np.arange(0, dtype=np.uint32) if val is None else val
    folder.mkdir(parents=True)
    train.astype(np.uint32).tofile(folder / "train.bin")
    val.astype(np.uint32).tofile(folder / "val.bin")
    meta = {"format": 1, "tokenizer_fingerprint": fingerprint, "vocab_size": 1 << 20, "dtype": "uint32",
            "splits": {"train": {"tokens": int(train.size)}, "val": {"tokens": int(val.size)}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def window_ids(x: torch.Tensor, seq_len: int, base: int = 0) -> list[int]:
    """Which window each row is, from its first token (tokens are base + their offset)."""
    return ((x[:, 0] - base) // seq_len).tolist()


def run(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


T, B = 8, 4


@pytest.fixture
def one(tmp_path) -> Path:
    return make_prepared(tmp_path / "one", np.arange(T * 37 + 3))  # 37 windows: not a multiple of B


def test_windows_are_naive_slices_and_y_is_x_shifted(one):
    tokens = np.fromfile(one / "train.bin", dtype=np.uint32).astype(np.int64)
    for x, y in run(TokenBatches([one], T, B, seed=3), 12):
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        for row_x, row_y, w in zip(x, y, window_ids(x, T), strict=True):
            assert row_x.tolist() == tokens[w * T: w * T + T].tolist()
            assert row_y.tolist() == tokens[w * T + 1: w * T + T + 1].tolist()


def test_every_window_once_per_epoch_and_reshuffled(one):
    loader = TokenBatches([one], T, B, seed=3)
    assert loader.windows_per_epoch == 37 and loader.batches_per_epoch == 10  # ceil(37 / 4)
    seen = [w for x, _ in run(loader, 3 * loader.batches_per_epoch) for w in window_ids(x, T)]
    epochs = [seen[e * 37:(e + 1) * 37] for e in range(3)]
    for ids in epochs:
        assert sorted(ids) == list(range(37))
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != sorted(epochs[0])
    assert loader.epoch == 3
    other = [w for x, _ in run(TokenBatches([one], T, B, seed=4), 10) for w in window_ids(x, T)]
    assert other[:37] != epochs[0]  # the seed decides the order


def test_resume_yields_the_identical_batch_sequence(tmp_path):
    a = make_prepared(tmp_path / "a", np.arange(T * 50 + 1))
    b = make_prepared(tmp_path / "b", 100_000 + np.arange(T * 23 + 1))
    kwargs = {"weights": [2.0, 1.0], "seed": 9, "rank": 1, "world_size": 2}
    straight = run(TokenBatches([a, b], T, B, **kwargs), 40)

    first = TokenBatches([a, b], T, B, **kwargs)
    run(first, 17)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain types only

    resumed = TokenBatches([a, b], T, B, **kwargs)
    resumed.load_state_dict(state)
    assert resumed.epoch == first.epoch
    for (x1, y1), (x2, y2) in zip(straight[17:], run(resumed, 23), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_state_from_other_settings_is_refused(one):
    state = TokenBatches([one], T, B).state_dict()
    with pytest.raises(CogniError, match="batch_size"):
        TokenBatches([one], T, B + 1).load_state_dict(state)


def test_mixture_follows_the_weights_and_each_dataset_keeps_its_epochs(tmp_path):
    a = make_prepared(tmp_path / "a", np.arange(T * 101 + 1))
    b = make_prepared(tmp_path / "b", 100_000 + np.arange(T * 29 + 1))
    loader = TokenBatches([a, b], T, 8, weights=[3, 1], seed=5)
    rows = torch.cat([x for x, _ in run(loader, 500)])
    from_b = rows[:, 0] >= 100_000
    share_a = 1 - from_b.float().mean().item()
    assert abs(share_a - 0.75) < 4 * (0.75 * 0.25 / len(rows)) ** 0.5  # binomial, 4 sigma
    for mask, base, n in ((~from_b, 0, 101), (from_b, 100_000, 29)):
        ids = window_ids(rows[mask], T, base)
        for e in range(len(ids) // n):  # each dataset: every full epoch is a permutation of its windows
            assert sorted(ids[e * n:(e + 1) * n]) == list(range(n))
    assert loader.windows_per_epoch == 130 and loader.batches_per_epoch == 17  # ceil(130 / 8)


def test_two_ranks_get_disjoint_windows_covering_the_epoch(tmp_path):
    data = make_prepared(tmp_path / "d", np.arange(T * 64 + 1))
    ranks = [TokenBatches([data], T, B, seed=1, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch == 8  # 64 / (4 * 2)
    ids = [[w for x, _ in run(r, 8) for w in window_ids(x, T)] for r in ranks]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == list(range(64))
    single = [w for x, _ in run(TokenBatches([data], T, B, seed=1), 16) for w in window_ids(x, T)]
    assert set(single) == set(range(64))


def test_fixed_batches_are_the_unshuffled_start_and_repeatable(tmp_path):
    a = make_prepared(tmp_path / "a", np.arange(5), val=np.arange(T * 10 + 1))
    b = make_prepared(tmp_path / "b", np.arange(5), val=100_000 + np.arange(T * 2 + 1))
    got = fixed_batches([a, b], T, 3, 4)
    # Naive reference: full batches in order, datasets taking turns; b has fewer windows than a batch,
    # so it gives one smaller batch.
    expected = [(a, [0, 1, 2]), (b, [0, 1]), (a, [3, 4, 5]), (a, [6, 7, 8])]
    assert len(got) == 4
    for (x, y), (folder, ids) in zip(got, expected, strict=True):
        base = 100_000 if folder == b else 0
        assert window_ids(x, T, base) == ids
        assert torch.equal(y, x + 1)
    again = fixed_batches([a, b], T, 3, 4)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(got, again, strict=True))
    assert len(fixed_batches([a], T, 3, 100)) == 3  # all full batches when fewer than n


def test_loader_errors_are_one_clear_sentence(tmp_path, one):
    (tmp_path / "raw").mkdir()
    with pytest.raises(CogniError, match="not a prepared dataset"):
        TokenBatches([tmp_path / "raw"], T, B)
    other = make_prepared(tmp_path / "other", np.arange(T * 10 + 1), fingerprint="another")
    with pytest.raises(CogniError, match="different tokenizers"):
        TokenBatches([one, other], T, B)
    with pytest.raises(CogniError, match="fewer than seq_len"):
        TokenBatches([one], 1000, B)
    with pytest.raises(CogniError, match="one positive weight"):
        TokenBatches([one], T, B, weights=[1, 2])
    with pytest.raises(CogniError, match="rank"):
        TokenBatches([one], T, B, rank=2, world_size=2)


def test_loader_reads_real_prepared_shards(shared_data, tmp_path):
    from cogni_mamba.data import prepare, read_meta

    class Bytes:
        vocab_size, eos_id, fingerprint = 320, 256, "bytes"

        def encode_batch(self, texts):
            return [list(t.encode()) for t in texts]

    out = tmp_path / "ts"
    prepare([f"tinystories:{shared_data / 'tinystories' / 'TinyStories-sample.txt'}"], Bytes(), out,
            val_fraction=0.02, progress=False)
    meta = read_meta(out)
    loader = TokenBatches([out], 256, 16)
    assert loader.windows_per_epoch == (meta["splits"]["train"]["tokens"] - 1) // 256
    x, y = next(loader)
    assert x.shape == (16, 256) and int(x.max()) <= 256
    assert len(fixed_batches([out], 256, 16, 2)) == 2
