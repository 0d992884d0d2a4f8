"""The one atomic writer: a failure at any point leaves the old content and no temp file behind."""

from __future__ import annotations

import errno

import pytest

from cogni_mamba.files import write_dir_atomically, write_file_atomically, write_text_atomically


def test_text_is_replaced_whole(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomically(path, "old\n")
    write_text_atomically(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.txt"
    write_text_atomically(path, "old\n")

    def fill(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_file_atomically(path, fill)
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_folder_is_swapped_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    write_dir_atomically(out, lambda d: (d / "x").write_text("1"))
    write_dir_atomically(out, lambda d: (d / "y").write_text("2"))
    assert sorted(p.name for p in out.iterdir()) == ["y"]

    def fill(d):
        (d / "z").write_text("3")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dir_atomically(out, fill)
    assert sorted(p.name for p in out.iterdir()) == ["y"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
