"""The CUDA code paths, checked on a CPU: device indices under torchrun, precision choices, TF32, MFU
peaks, fp16 resume, DDP / FSDP2 wrapping and compilation (mocked device counts and properties, and
process groups of one over gloo; the same checks run on CUDA where there is one)."""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from train_worker import RandomTokens, tiny_model_config  # noqa: E402

from cogni_mamba import device as device_module  # noqa: E402
from cogni_mamba.config import TrainConfig  # noqa: E402
from cogni_mamba.finetune.sft import ChatBatches, collate  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402
from cogni_mamba.train import Trainer, build_trainer, distributed, precision  # noqa: E402  # noqa: E402
from cogni_mamba.train.distributed import DistInfo, pick_device, wrap_ddp  # noqa: E402
from cogni_mamba.train.metrics import device_peak_flops, peak_flops_for  # noqa: E402
from tests.references import logged_losses  # noqa: E402

GIB = 1024**3


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine that claims four CUDA devices (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


# --- devices under torchrun ------------------------------------------------------------------------

def test_plain_cuda_means_this_ranks_gpu(four_gpus):
    assert pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert pick_device("cuda", local_rank=5) == torch.device("cuda", 1)  # 5 mod 4
    assert pick_device(None, local_rank=3) == torch.device("cuda", 3)
    assert pick_device("cuda:2", local_rank=0) == torch.device("cuda", 2)  # an explicit index is kept
    assert pick_device("cpu", local_rank=3) == torch.device("cpu")


def test_ddp_gets_this_ranks_device_index_and_no_buffer_broadcast(four_gpus, monkeypatch):
    seen = {}

    def fake_ddp(module, **kwargs):
        seen.update(kwargs)
        return module

    fake_ddp.__signature__ = __import__("inspect").signature(torch.nn.parallel.DistributedDataParallel)
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    wrap_ddp(torch.nn.Linear(2, 2), DistInfo(rank=3, world_size=4, local_rank=3), pick_device("cuda", 3))
    assert seen.pop("device_ids") == [3]
    assert seen in ({"forward_sync_buffers": False}, {"broadcast_buffers": False})  # the name before torch 2.12


def test_unknown_device_is_one_sentence():
    from cogni_mamba.errors import CogniError

    with pytest.raises(CogniError, match="Unknown device 'gpu0'"):
        pick_device("gpu0")


# --- precision --------------------------------------------------------------------------------------

def _bf16(native: bool):
    """torch.cuda.is_bf16_supported of a GPU with native bf16, or one where torch only emulates it."""
    return lambda including_emulation=True: native or including_emulation


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "fp16")])
def test_auto_precision_needs_native_bf16_on_cuda(monkeypatch, native, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", _bf16(native))
    cuda = torch.device("cuda", 0)
    assert precision.resolve_precision("auto", cuda) == want
    assert device_module.supports_bf16(cuda) is native


@pytest.mark.parametrize("name, dev, want", [("fp32", "cuda", "high"), ("bf16", "cuda", "highest"),
                                             ("fp32", "cpu", "highest")])
def test_fp32_on_cuda_uses_tf32_matmuls(name, dev, want):
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        precision.configure_matmul(name, torch.device(dev))
        assert torch.get_float32_matmul_precision() == want
    finally:
        torch.set_float32_matmul_precision(before)


# --- MFU: the peak of each part, from NVIDIA's datasheets -------------------------------------------

@pytest.mark.parametrize("name, memory, sms, tflops", [
    ("NVIDIA H100 80GB HBM3", 80 * GIB, 132, 989),  # SXM5
    ("NVIDIA H100 PCIe", 80 * GIB, 114, 756),
    ("NVIDIA H100 NVL", 94 * GIB, 132, 835),
    ("NVIDIA H100", 80 * GIB, 114, 756),  # unnamed variant: 114 SMs is the PCIe card
    ("NVIDIA H100", 94 * GIB, 132, 835),  # ... 94 GB is the NVL card
    ("NVIDIA H200", 141 * GIB, 132, 989),
    ("NVIDIA H200 NVL", 141 * GIB, 132, 835),
    ("NVIDIA GH200 480GB", 96 * GIB, 132, 989),
    ("NVIDIA A100-SXM4-80GB", 80 * GIB, 108, 312),
])
def test_peak_flops_per_part(name, memory, sms, tflops):
    assert peak_flops_for(name, memory, sms) == pytest.approx(tflops * 1e12)


def test_peak_flops_unknown_gpu_and_cpu():
    assert peak_flops_for("Tesla T4", 15 * GIB, 40) is None
    assert device_peak_flops(torch.device("cpu")) is None


def test_device_peak_flops_reads_the_devices_properties(monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 PCIe", total_memory=80 * GIB, multi_processor_count=114)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    assert device_peak_flops(torch.device("cuda", 0)) == pytest.approx(756e12)


# --- the attention kernel probe ---------------------------------------------------------------------

def test_attention_probe_uses_the_models_gqa_shapes(monkeypatch):
    """A flash kernel that refuses grouped-query attention must not be reported for a GQA model."""
    calls = []

    def sdpa(q, k, v, is_causal=False, enable_gqa=False, **kw):
        calls.append((q.shape[1], k.shape[1], enable_gqa))
        if torch.backends.cuda.flash_sdp_enabled() and enable_gqa:
            raise RuntimeError("flash: no GQA here")
        return q

    monkeypatch.setattr(device_module, "F", types.SimpleNamespace(scaled_dot_product_attention=sdpa))
    label = device_module.attention_backend(torch.device("cpu"), torch.float32, 64, 16, 4)
    assert label == "memory-efficient"
    assert calls[0] == (16, 4, True)
    assert device_module.attention_backend(torch.device("cpu"), torch.float32, 64, 16, 16) == "flash"


# --- trainer runs on the CPU ------------------------------------------------------------------------

def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(batch_size=4, grad_accum=1, max_steps=3, lr=3e-3, min_lr=3e-4, warmup_steps=1, eval_interval=3,
                save_interval=3, precision="fp32", out_dir=str(out))
    return TrainConfig(**{**base, **kw})


def _trainer(out: Path, batches=None, device="cpu", dist_info=None, **kw) -> Trainer:
    torch.manual_seed(1234)
    val = [next(RandomTokens(4, 16, seed=99))]
    return build_trainer(CogniMamba(tiny_model_config()), batches or RandomTokens(4, 16, seed=7), val,
                         _cfg(out, **kw), device=device, dist=dist_info, progress=False, log=lambda m: None)


def test_fp16_resume_from_a_checkpoint_without_a_loss_scale(tmp_path):
    run = tmp_path / "run"
    _trainer(run).train()  # fp32: its checkpoint's scaler state is {}
    fp16 = _trainer(run)
    fp16.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what fp16 builds (CUDA-only in the trainer)
    fp16.resume()
    assert fp16.step == 3 and fp16.scaler.get_scale() == 2.0**16  # a fresh scale


def test_fp16_resume_restores_the_saved_loss_scale(tmp_path):
    run = tmp_path / "run"
    first = _trainer(run)
    first.scaler = torch.amp.GradScaler("cpu", init_scale=512.0, enabled=True)
    first.train()
    again = _trainer(run)
    again.scaler = torch.amp.GradScaler("cpu", enabled=True)
    again.resume()
    assert again.scaler.get_scale() == 512.0


def counting_compile(monkeypatch) -> list:
    """torch.compile with a backend that counts the graphs dynamo hands it (and runs them as they are)."""
    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    return graphs


def test_evaluation_does_not_compile_the_model_again(tmp_path, monkeypatch):
    graphs = counting_compile(monkeypatch)
    trainer = _trainer(tmp_path / "run", compile=True, max_steps=1)
    trainer.train_step()
    compiled = len(graphs)
    assert compiled >= 1
    eager = trainer.evaluate()
    assert len(graphs) == compiled
    with torch.no_grad():  # and it is the model's loss on the val batch
        x, y = trainer.val_batches[0]
        assert eager == pytest.approx(float(trainer.raw_model(x, y)[1]), rel=1e-6)


class Widths:
    """Batches of the given widths; `variable_length` as ChatBatches says it."""

    variable_length = True

    def __init__(self, widths):
        self.widths = list(widths)

    def __iter__(self):
        for T in self.widths:
            x = torch.randint(0, 64, (2, T))
            yield x, x.clone()


def test_batches_of_varying_length_compile_once(tmp_path, monkeypatch):
    graphs = counting_compile(monkeypatch)
    trainer = _trainer(tmp_path / "run", batches=Widths([40, 24, 56]), compile=True, max_steps=3, batch_size=2)
    for _ in range(3):
        assert trainer.train_step().applied
    assert len(graphs) == 1


def test_chat_batches_pad_to_a_multiple_within_the_context():
    ex = lambda n: (list(range(n)), list(range(n)))  # noqa: E731
    assert collate([ex(5), ex(9)], 0, multiple=8)[0].shape == (2, 16)
    assert collate([ex(5), ex(17)], 0, multiple=8, max_len=20)[0].shape == (2, 20)  # capped at the context
    assert collate([ex(5), ex(9)], 0)[0].shape == (2, 9)
    batches = ChatBatches([ex(3), ex(30), ex(7)], 3, 0, pad_multiple=64, max_len=48)
    x, y = next(batches)
    assert x.shape == (3, 48) and bool((y[:, 30:] == -100).all())
    assert ChatBatches.variable_length


# --- DDP and FSDP2 over a process group of one (gloo here, nccl on a GPU) ----------------------------

def need(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device (run on a GPU: scripts/gpu_check.sh)")


def syncs_buffers(ddp) -> bool:
    return getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", True))


@contextlib.contextmanager
def group_of_one(device: str, tmp_path: Path):
    need(device)
    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_ddp_over_a_group_of_one_equals_plain_training(tmp_path, device):
    need(device)
    plain = _trainer(tmp_path / "plain", device=device)
    plain.train()
    with group_of_one(device, tmp_path):
        ddp = _trainer(tmp_path / "ddp", device=device)
        assert isinstance(ddp.model, torch.nn.parallel.DistributedDataParallel)
        assert syncs_buffers(ddp.model) is False  # the rotary tables are not re-sent every step
        ddp.train()
    want = logged_losses(tmp_path / "plain")
    got = logged_losses(tmp_path / "ddp")
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-5), step


def test_compile_wraps_ddp(tmp_path, monkeypatch):
    counting_compile(monkeypatch)
    with group_of_one("cpu", tmp_path):
        trainer = _trainer(tmp_path / "run", compile=True)
        ddp = trainer.model._orig_mod  # torch.compile(DDP(model)), not DDP(torch.compile(model))
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        assert ddp.module is trainer.raw_model


def test_fsdp_compiles_each_block_and_keeps_parameter_names(tmp_path, monkeypatch):
    with group_of_one("cpu", tmp_path):
        trainer = _trainer(tmp_path / "run", compile=True, parallel="fsdp")
        assert trainer.model is trainer.raw_model  # no whole-model wrapper
        assert all(block._compiled_call_impl is not None for block in trainer.raw_model.layers)
        assert not any("_orig_mod" in name for name in trainer.raw_model.state_dict())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fsdp_bf16_gathers_bf16_weights_and_keeps_fp32_shards(tmp_path, device):
    need(device)
    seen = []
    plain = _trainer(tmp_path / "plain", device=device, precision="bf16", max_steps=2)
    plain.train()
    with group_of_one(device, tmp_path):
        trainer = _trainer(tmp_path / "fsdp", device=device, precision="bf16", parallel="fsdp", max_steps=2)
        wq = trainer.raw_model.layers[0].attention.wq
        wq.register_forward_pre_hook(lambda m, args: seen.append(m.weight.dtype))
        trainer.train()
        assert seen and set(seen) == {torch.bfloat16}  # what forward computes with
        assert {p.dtype for p in trainer.raw_model.parameters()} == {torch.float32}  # what AdamW steps
    want = logged_losses(tmp_path / "plain")
    for step, loss in logged_losses(tmp_path / "fsdp").items():
        assert loss == pytest.approx(want[step], rel=2e-2), step  # bf16 weights vs autocast: close, not equal


def test_fsdp_without_a_group_is_left_alone():
    model = CogniMamba(tiny_model_config())
    assert distributed.shard_fsdp(model, DistInfo(), torch.device("cpu"), precision="bf16") is model
