"""Shared test fixtures: the sample-data folder beside the repo, a fixed seed and one CPU thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """A fixed seed, and one intra-op thread: the test models are tiny, so extra threads only add
    hand-off overhead (10-40x slower on a busy 2-core machine)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or skip where this checkout has no sample data beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"sample data folder {SHARED_DATA} is absent")
    return SHARED_DATA
