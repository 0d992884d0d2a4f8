"""torchrun / DDP / FSDP2 plumbing: who am I, which device, and the few collectives the trainer needs.

Under `torchrun --nproc_per_node N` the environment carries RANK, WORLD_SIZE and LOCAL_RANK; we
join a process group (nccl on CUDA, gloo on CPU) and wrap the model in DDP (`train.parallel =
"ddp"`: every rank holds the whole model) or shard it with FSDP2 `fully_shard` (`"fsdp"`: each rank
holds 1/N of the weights, gradients and optimizer state, for models that do not fit one GPU). In a
plain process everything here is a no-op, so the trainer has one code path.

Checkpoints are the same under both: the full, unsharded weights and an optimizer state keyed by
parameter index, as `optimizer.state_dict()` gives in a single process, so a run can resume under
either and `load_checkpoint` reads the weights anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import unwrap  # noqa: F401  (the one unwrap; train code imports it from here too)
from ..device import parse_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None = None, local_rank: int = 0) -> torch.device:
    """`requested` if given (not "auto"), else this rank's CUDA device when there is one, else the CPU.

    A plain "cuda" (given or chosen) means this rank's GPU, cuda:LOCAL_RANK (modulo the GPUs
    present), so under torchrun each rank gets its own and DDP gets a device index.
    """
    if requested and requested != "auto":
        device = parse_device(requested)
        if device.type != "cuda" or device.index is not None:
            return device
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if the environment names one; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def current() -> DistInfo:
    """The DistInfo of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP around the model when there is a process group (the model itself otherwise).

    Like `shard_fsdp` it also wraps over a process group of one (a single-GPU check of this path).
    The only buffers are the rotary tables, computed identically on every rank, so they are not
    re-broadcast from rank 0 before every forward (`broadcast_buffers=False`).
    """
    if not info.enabled and not dist.is_initialized():
        return model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.12
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded by FSDP2 `fully_shard`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_fsdp(model: nn.Module, info: DistInfo, device: torch.device, *, precision: str = "fp32",
               compile: bool = False) -> nn.Module:
    """Shard `model` in place with FSDP2: each block of `model.layers` is its own unit, the rest the root's.

    A unit's full weights exist only while it runs (all-gathered, then freed), so peak memory is the
    shards plus about one block. The model may still be on the CPU: `fully_shard` moves each shard to
    the mesh's device, so the whole model never has to fit one GPU. It also shards over a process group
    of one (a single-GPU check of this path); without any process group it leaves the model alone.

    With `precision="bf16"` the weights are all-gathered and computed with in bf16 (half the traffic
    of fp32) while gradients are reduced and the optimizer steps in fp32. With `compile`, each block is
    compiled in place (`Module.compile`: parameter names unchanged) before it is sharded, so the
    compiled graphs end at the units' boundaries, where FSDP's all-gathers and frees run.
    """
    if not info.enabled and not dist.is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size() if dist.is_initialized() else info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for block in getattr(model, "layers", []):
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Within it, backward() reduces gradients across ranks only when `sync` (skip it on all but the
    last micro-batch of an accumulation: DDP's no_sync, FSDP2's set_requires_gradient_sync)."""
    if sync:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
            yield


def tied_names(model: nn.Module) -> dict[str, str]:
    """alias -> first name for parameters registered under several names (the tied embedding/head)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _full_options(**kw: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's CPU ({} on other ranks); collective: call on every rank.

    Tied names point at one tensor again (gathering copies each name), so the checkpoint stores it once.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    for alias, name in tied_names(model).items():
        if name in state:
            state[alias] = state[name]
    return state


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Shard full weights (every rank passes the same dict) into an FSDP2 model."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_full_options())  # it rewrites the dict it gets


def _index_order(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order `optimizer.state_dict()` numbers them (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state on rank 0's CPU, keyed by index like `optimizer.state_dict()`
    ({} on other ranks); collective: call on every rank."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(_index_order(model, optimizer))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Shard an index-keyed full optimizer state (every rank passes the same dict) into FSDP2's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    order = _index_order(model, optimizer)
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    full = {"state": {order[i]: s for i, s in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, full, options=_full_options())


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The mean of `t` over all ranks (a copy; `t` itself is left alone)."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / info.world_size


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `t` over all ranks (a copy)."""
    if not info.enabled:
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def max_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The largest `value` of all ranks, on every rank (one collective for a ranked set of flags)."""
    if not info.enabled:
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def min_over_ranks(value: int, info: DistInfo, device: torch.device) -> int:
    """The smallest `value` of all ranks, on every rank."""
    return -max_over_ranks(-value, info, device)


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (our own processes: plain pickle is fine)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for all ranks (no-op in a single process)."""
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Leave the process group."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(info: DistInfo, code: int = 0) -> None:
    """End a worker of a multi-process run once its work is saved and its process group is gone.

    Seen here (CPU, gloo, torch 2.13): a rank that had received SIGTERM sometimes stayed in interpreter
    shutdown, waiting on a native thread, so torchrun never saw it exit (about one run in three of
    tests/test_train_distributed.py's SIGTERM test). Everything is written and flushed by this point,
    so the process ends at once. A single process returns normally."""
    if not info.enabled:
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
