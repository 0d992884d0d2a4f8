"""Distributed trainer checks: FSDP2 against one process, SIGTERM under torchrun, out-of-memory advice.

The multi-process tests run `tests/train_worker.py` under `torchrun --standalone --nproc_per_node 2`
on the CPU (gloo). The worker's data source draws one global batch per micro-step and each rank takes
its rows, so one process with the global batch sees exactly the tokens two ranks see together: the
single-process run is the independent reference.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))

from train_worker import RandomTokens, tiny_model_config  # noqa: E402

from cogni_mamba.config import ConfigError, TrainConfig  # noqa: E402
from cogni_mamba.errors import CogniError  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402
from cogni_mamba.train import Trainer, build_trainer  # noqa: E402
from tests.references import logged_losses  # noqa: E402

WORKER = Path(__file__).with_name("train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RUN_ARGS = ["--steps", "8", "--global-batch", "8", "--accum", "2", "--save-interval", "4", "--eval-interval", "4"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]


def run(cmd: list[str], timeout: float = 120) -> str:
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def assert_losses_close(got: dict[int, float], want: dict[int, float], steps: range) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def rewind(run_dir: Path, to: str) -> None:
    """Make checkpoint `to` the run's latest, as if the run had been killed just after writing it."""
    for p in run_dir.iterdir():
        if p.is_dir() and p.name not in (to,):
            shutil.rmtree(p)
    (run_dir / "latest").write_text(to + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An 8-step single-process run and the same run as two FSDP2 ranks (checkpoints at steps 4 and 8)."""
    root = tmp_path_factory.mktemp("fsdp")
    run([sys.executable, str(WORKER), "--out", str(root / "single"), *RUN_ARGS])
    run([*TORCHRUN, "--out", str(root / "fsdp"), *RUN_ARGS, "--parallel", "fsdp"], timeout=180)
    return {"single": root / "single", "fsdp": root / "fsdp"}


# --- FSDP2 -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_process_fsdp_equals_one_process(runs):
    single, fsdp = logged_losses(runs["single"]), logged_losses(runs["fsdp"])
    assert_losses_close(fsdp, single, range(1, 9))
    val = [json.loads(line)["val_loss"] for line in (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    ref = [json.loads(line)["val_loss"] for line in (runs["single"] / "metrics.jsonl").read_text().splitlines()
           if "val_loss" in line]
    assert val == pytest.approx(ref, rel=1e-5)  # 2 val batches split over 2 ranks, recombined


@pytest.mark.slow
def test_fsdp_checkpoint_holds_the_full_weights_and_optimizer_state(runs):
    from cogni_mamba import load_checkpoint

    full = CogniMamba(tiny_model_config())  # the unsharded shapes, from a model built here
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    stored = load_file(str(runs["fsdp"] / "step-8" / "model.safetensors"))
    assert "output.weight" not in stored  # the tied head is stored once, as in a single-process save
    assert {k: tuple(v.shape) for k, v in stored.items()} == {k: s for k, s in shapes.items() if k != "output.weight"}

    m1, _ = load_checkpoint(runs["single"])
    m2, _ = load_checkpoint(runs["fsdp"])
    assert m2.output.weight is m2.tok_embeddings.weight
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)

    # The optimizer state is keyed by parameter index with full-size moments, like the single process's.
    s1 = torch.load(runs["single"] / "step-8" / "train_state.pt", weights_only=True)["optimizer"]
    s2 = torch.load(runs["fsdp"] / "step-8" / "train_state.pt", weights_only=True)["optimizer"]
    assert [g["params"] for g in s2["param_groups"]] == [g["params"] for g in s1["param_groups"]]
    assert sorted(s2["state"]) == sorted(s1["state"])
    for i, st in s1["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(s2["state"][i][key], st[key], rtol=1e-3, atol=1e-6, msg=f"{i}.{key}")
        assert float(s2["state"][i]["step"]) == float(st["step"]) == 8


@pytest.mark.slow
def test_fsdp_resumes_its_own_checkpoint(runs, tmp_path):
    resumed = tmp_path / "fsdp"
    shutil.copytree(runs["fsdp"], resumed)
    rewind(resumed, "step-4")
    out = run([*TORCHRUN, "--out", str(resumed), *RUN_ARGS, "--parallel", "fsdp", "--resume"], timeout=180)
    assert "resumed from" in out and "at step 4" in out
    assert_losses_close(logged_losses(resumed), logged_losses(runs["single"]), range(1, 9))


@pytest.mark.slow
def test_fsdp_with_muon_and_wsd_equals_one_process_and_resumes(tmp_path):
    # Muon orthogonalises whole matrices; under FSDP2 its Newton-Schulz products run on sharded DTensors.
    args = [*RUN_ARGS, "--optimizer", "muon", "--schedule", "wsd"]
    run([sys.executable, str(WORKER), "--out", str(tmp_path / "single"), *args])
    run([*TORCHRUN, "--out", str(tmp_path / "fsdp"), *args, "--parallel", "fsdp"], timeout=180)
    assert_losses_close(logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "single"), range(1, 9))
    rewind(tmp_path / "fsdp", "step-4")
    run([*TORCHRUN, "--out", str(tmp_path / "fsdp"), *args, "--parallel", "fsdp", "--resume"], timeout=180)
    assert_losses_close(logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "single"), range(1, 9))


@pytest.mark.slow
def test_fsdp_resumes_a_single_process_checkpoint(runs, tmp_path):
    # Same checkpoint format: a one-process run continues as two FSDP ranks (the global data stream is
    # one generator, so the batches match too).
    resumed = tmp_path / "single"
    shutil.copytree(runs["single"], resumed)
    rewind(resumed, "step-4")
    run([*TORCHRUN, "--out", str(resumed), *RUN_ARGS, "--parallel", "fsdp", "--resume"], timeout=180)
    assert_losses_close(logged_losses(resumed), logged_losses(runs["single"]), range(1, 9))


def _one_process_run(out: Path, device: str, parallel: str, *, resume: bool = False) -> Trainer:
    torch.manual_seed(1234)
    model = CogniMamba(tiny_model_config())
    cfg = TrainConfig(batch_size=4, grad_accum=2, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_interval=3,
                      save_interval=3, precision="fp32", out_dir=str(out), parallel=parallel)
    val = [next(RandomTokens(4, 16, seed=99 + i)) for i in range(2)]
    trainer = build_trainer(model, RandomTokens(4, 16, seed=7), val, cfg, device=device, progress=False,
                            log=lambda m: None)
    if resume:
        trainer.resume()
    trainer.train()
    return trainer


@pytest.fixture
def group_of_one(request, tmp_path):
    """A process group of one rank (gloo on the CPU, nccl on a GPU), torn down afterwards."""
    import torch.distributed as dist

    device = request.param
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device (run on a GPU: scripts/gpu_check.sh)")
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        yield device
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("group_of_one", ["cpu", "cuda"], indirect=True)
def test_fsdp_over_a_group_of_one_equals_plain_training(tmp_path, group_of_one):
    # The FSDP2 code path on a single device (the GPU check runs the cuda case): sharding, gathering the
    # full weights and optimizer state for a checkpoint, and resuming, against a plain run built here.
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from cogni_mamba import load_checkpoint
    from cogni_mamba.train.distributed import is_sharded

    device, tol = group_of_one, (1e-5 if group_of_one == "cpu" else 1e-4)
    dist.barrier()
    fsdp = _one_process_run(tmp_path / "fsdp", device, "fsdp")
    assert is_sharded(fsdp.raw_model)
    weight = fsdp.raw_model.layers[0].attention.wq.weight
    assert isinstance(weight, DTensor) and weight.device.type == device
    plain = _one_process_run(tmp_path / "plain", device, "ddp")
    assert not is_sharded(plain.raw_model)
    want = logged_losses(tmp_path / "plain")
    for step, loss in logged_losses(tmp_path / "fsdp").items():
        assert loss == pytest.approx(want[step], rel=tol), step

    m_plain, _ = load_checkpoint(tmp_path / "plain")
    m_fsdp, _ = load_checkpoint(tmp_path / "fsdp")
    for (name, a), b in zip(m_plain.state_dict().items(), m_fsdp.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5, msg=name)

    rewind(tmp_path / "fsdp", "step-3")
    _one_process_run(tmp_path / "fsdp", device, "fsdp", resume=True)
    resumed = logged_losses(tmp_path / "fsdp")
    assert sorted(resumed) == list(range(1, 7))
    for step, loss in resumed.items():
        assert loss == pytest.approx(want[step], rel=tol), step


def test_parallel_setting_is_validated():
    with pytest.raises(ConfigError, match="train.parallel must be one of ddp, fsdp"):
        TrainConfig(parallel="zero3")
    with pytest.raises(ConfigError, match="fsdp does not support fp16"):
        TrainConfig(parallel="fsdp", precision="fp16")


# --- SIGTERM under torchrun --------------------------------------------------------------------

def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in lines[:-1]), default=0)  # the last may be half written


def _ranks_of(agent_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (Linux /proc)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(e.decode(errors="replace").split("=", 1) for e in environ if b"=" in e)
        ranks[int(env["RANK"])] = pid
    return ranks


def _sigterm_run(run_dir: Path, target: str) -> tuple[subprocess.Popen, str]:
    """Start a long 2-rank DDP run, SIGTERM `target` ("agent" or a rank) after step 5, return its output."""
    cmd = [*TORCHRUN, "--out", str(run_dir), "--steps", "200", "--save-interval", "100", "--eval-interval", "100",
           "--sleep", "0.03"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while _last_step(run_dir) < 5:
            assert proc.poll() is None, "the run ended before it could be signalled"
            assert time.time() < deadline, "the run did not reach step 5 in time"
            time.sleep(0.01)
        pid = proc.pid if target == "agent" else _ranks_of(proc.pid)[int(target)]
        os.kill(pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        proc.kill()
        proc.wait()
    return proc, output


def _assert_one_save_at_one_step(run_dir: Path, output: str) -> None:
    # Both ranks print to one pipe, so their lines may run together: find the summaries anywhere.
    summaries = re.findall(r"(finished|signal|time): (\d+) steps, best val loss", output)
    assert len(summaries) == 2, output  # each rank returned from train() and printed its summary
    assert len(set(summaries)) == 1, summaries  # ... stopped at the same step, for the same reason
    reason, stopped = summaries[0][0], int(summaries[0][1])
    assert reason == "signal"
    assert 5 <= stopped < 100
    assert max(logged_losses(run_dir)) == stopped
    # One checkpoint, at that step (no periodic save is due before step 100), whole and named by `latest`.
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == [f"step-{stopped}"]
    assert (run_dir / "latest").read_text().strip() == f"step-{stopped}"
    state = torch.load(run_dir / f"step-{stopped}" / "train_state.pt", weights_only=True)
    assert state["step"] == stopped and len(state["ranks"]) == 2  # both ranks' RNG and data positions


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    proc, output = _sigterm_run(tmp_path / "run", target="1")
    assert proc.returncode == 0, output  # torchrun exits 0 only when every rank exited 0
    _assert_one_save_at_one_step(tmp_path / "run", output)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_once_on_all_ranks(tmp_path):
    # torchrun forwards SIGTERM to every worker; it then exits non-zero itself (its own choice), but the
    # workers stop together after one save.
    _, output = _sigterm_run(tmp_path / "run", target="agent")
    assert "received SIGTERM" in output
    _assert_one_save_at_one_step(tmp_path / "run", output)


# --- out of memory -----------------------------------------------------------------------------

def _trainer_whose_forward_raises(tmp_path, error: BaseException) -> Trainer:
    torch.manual_seed(0)
    model = CogniMamba(tiny_model_config())

    def forward(*args, **kwargs):
        raise error

    model.forward = forward
    cfg = TrainConfig(batch_size=4, grad_accum=2, max_steps=3, precision="fp32", out_dir=str(tmp_path / "run"))
    return Trainer(model, RandomTokens(4, 16, seed=1), None, cfg, device="cpu", progress=False, log=lambda m: None)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                 "allocate 1073741824 bytes."),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 1073741824 bytes. Error code 12 (Cannot allocate memory)"),  # Linux's words
    RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB)"),
], ids=["cuda", "cpu", "cpu-linux", "mps"])
def test_out_of_memory_says_what_to_lower(tmp_path, error):
    trainer = _trainer_whose_forward_raises(tmp_path, error)
    with pytest.raises(CogniError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith("Out of memory while training on a micro batch of 4 x 16 tokens")
    for advice in ("train.batch_size (now 4)", "train.grad_accum (now 2)", "data.seq_len", "--precision bf16",
                   "smaller --preset"):
        assert advice in message, advice
    assert "\n" not in message and caught.value.__cause__ is None and caught.value.__suppress_context__
    assert trainer.step == 0 and not (tmp_path / "run" / "latest").exists()


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path):
    trainer = _trainer_whose_forward_raises(tmp_path, RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        trainer.train()
    assert not isinstance(caught.value, CogniError)
