"""Running out of memory or disk is one sentence: the allocators' own errors (torch's, raised for real here by
asking the CPU allocator for a petabyte) and the writers' (ENOSPC, numpy's short write, safetensors') are recognised,
and the CLI says what to do instead of printing a traceback."""

from __future__ import annotations

import json

import pytest
import torch

from cogni_mamba import cli
from cogni_mamba.errors import allocation_size, is_out_of_memory


def info_that_runs(monkeypatch, run) -> None:
    """`cogni-mamba info` doing `run(args)` instead: any command's failure, through the real CLI entry point."""
    import cogni_mamba.cli.info as info

    monkeypatch.setattr(info, "run", run)


def raising(error: BaseException):
    def run(args):
        raise error

    return run


def real_cpu_allocation_failure() -> RuntimeError:
    with pytest.raises(RuntimeError) as caught:
        torch.empty(1 << 50, dtype=torch.uint8)  # 1 PiB: refused at once, nothing is touched
    return caught.value


def test_the_allocators_words_are_recognised():
    cpu = real_cpu_allocation_failure()
    assert is_out_of_memory(cpu) and allocation_size(cpu) == "1,048,576.0 GiB"
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator's error
    assert allocation_size(RuntimeError("no size here")) == ""


def test_check_with_a_model_too_big_for_this_machine_is_one_sentence(tmp_path, capsys):
    config = tmp_path / "huge.json"
    config.write_text(json.dumps({"preset": "nano", "model": {"vocab_size": 100_000_000_000}}))
    assert cli.main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: Out of memory building or running nano at batch 2 x 64 on cpu; try a smaller --batch, "
                   "--seq or preset (or a smaller model.vocab_size, dim or max_seq_len)."]


def test_any_command_that_runs_out_of_memory_says_so_without_a_traceback(monkeypatch, capsys):
    info_that_runs(monkeypatch, lambda args: torch.empty(1 << 50, dtype=torch.uint8))
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: this machine ran out of memory (an allocation of 1,048,576.0 GiB) running `cogni-mamba "
                   "info`; use a smaller model (preset, model.dim, n_layers, vocab_size, max_seq_len) or batch, or "
                   "free some memory.\n")


def test_other_runtime_errors_still_surface(monkeypatch):
    info_that_runs(monkeypatch, raising(RuntimeError("mat1 and mat2 shapes cannot be multiplied")))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli.main(["info"])


def test_rotary_tables_larger_than_free_memory_are_refused_before_they_are_built(monkeypatch):
    """A mistyped model.max_seq_len (1e8) once had the OS kill `check` while it built the rotary tables (45 GB);
    tables whose peak (7 x positions x head_dim / 2 fp32 values) passes the free memory are refused in a sentence."""
    from cogni_mamba import CogniMamba, ModelConfig
    from cogni_mamba import model as model_module
    from cogni_mamba.errors import CogniError

    monkeypatch.setattr(model_module, "free_memory", lambda device: 2**30)  # this machine has 1 GiB free
    small = dict(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, hidden_dim=64)  # head_dim 32
    with pytest.raises(CogniError, match=r"rotary tables for 2,400,000 positions .* need about 1\.0 GiB .*lower "
                                         r"model\.max_seq_len"):
        CogniMamba(ModelConfig(**small, max_seq_len=2_400_000))  # 7 x 2.4M x 16 x 4 bytes = 1.075e9 > 2**30
    model = CogniMamba(ModelConfig(**small, max_seq_len=1_000_000))  # 448 MB: checked, and it fits
    assert model.rotary.cos.shape == (1_000_000, 32)


def test_free_memory_where_the_system_does_not_say_what_is_available(monkeypatch):
    """Linux: MemAvailable from /proc/meminfo (checked against sysconf's own count of available pages). macOS has
    neither /proc nor SC_AVPHYS_PAGES (os.sysconf raises ValueError): all of its RAM; no sysconf at all: no limit."""
    import builtins
    import os

    from cogni_mamba.device import free_memory

    cpu = torch.device("cpu")
    page, total = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
    assert 0 < free_memory(cpu) <= page * total
    real_open, real_sysconf = builtins.open, os.sysconf

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    def mac_sysconf(name):
        if name == "SC_AVPHYS_PAGES":
            raise ValueError("unrecognized configuration name")
        return real_sysconf(name)

    monkeypatch.setattr(builtins, "open", no_proc)
    monkeypatch.setattr(os, "sysconf", mac_sysconf)
    assert free_memory(cpu) == page * total
    monkeypatch.delattr(os, "sysconf")
    assert free_memory(cpu) == 2**63


@pytest.mark.parametrize(("error", "said"), [
    (OSError(28, "No space left on device", "/data/out/train.bin"),
     "error: the disk ran out of space writing /data/out/train.bin while running `cogni-mamba info`; free some space "
     "or write somewhere else, then run it again.\n"),
    (OSError("524288 requested and 458960 written"),  # numpy's short write (ndarray.tofile on a full disk)
     "error: the disk ran out of space while running `cogni-mamba info`; free some space or write somewhere else, "
     "then run it again.\n"),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' words
     "error: the disk ran out of space while running `cogni-mamba info`; free some space or write somewhere else, "
     "then run it again.\n"),
    (PermissionError(13, "Permission denied", "/srv/models"),
     "error: Permission denied (/srv/models) while running `cogni-mamba info`; check the path, its permissions and "
     "the disk.\n"),
], ids=["enospc", "numpy-short-write", "safetensors", "permission"])
def test_a_full_disk_or_a_refused_path_is_one_sentence(monkeypatch, capsys, error, said):
    """What `export` and `prepare` printed as tracebacks on a 1 MB tmpfs (numpy's and safetensors' own errors), and
    a folder the user may not write: one sentence from the CLI, exit 2."""
    info_that_runs(monkeypatch, raising(error))
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err == said


def test_an_oserror_without_words_still_surfaces(monkeypatch):
    info_that_runs(monkeypatch, raising(OSError("something odd")))
    with pytest.raises(OSError, match="something odd"):
        cli.main(["info"])
