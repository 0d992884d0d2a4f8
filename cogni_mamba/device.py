"""Which device to run on, how much memory it has free, which precisions it supports, and which attention
kernel SDPA picks."""

from __future__ import annotations

import functools
import mmap
import os

import torch
import torch.nn.functional as F


def best_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    """A device from a user string ("auto", "cpu", "cuda", "cuda:1", "mps")."""
    if name in (None, "", "auto"):
        return best_device()
    return parse_device(name)


def parse_device(name: str) -> torch.device:
    """`name` as a torch.device; an unknown name, or CUDA where there is none, is a CogniError."""
    from .errors import CogniError

    try:
        device = torch.device(name)
    except RuntimeError:
        raise CogniError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CogniError(f"Device {name!r} was asked for but CUDA is not available here; use --device cpu.")
    return device


def free_memory(device: torch.device) -> int:
    """Bytes free for a run: the GPU's free memory, or the RAM the kernel calls available (Linux); where the system
    does not say (macOS has no available-pages count, Windows no sysconf), all of its RAM, or else no limit: an
    estimate is then only refused when it passes what the machine has at all."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
            return mmap.PAGESIZE * os.sysconf(pages)  # mmap's page size: macOS may not know "SC_PAGE_SIZE" either
        except (AttributeError, ValueError, OSError):
            continue
    return 2**63


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; empty elsewhere), e.g. "avx512_vnni"."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX512-BF16 / AMX); elsewhere it emulates bf16 slowly."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private probe; absent in some builds
        return False


def cuda_has_native_bf16() -> bool:
    """Whether this GPU computes bf16 natively (Ampere and newer); torch also reports emulated bf16 as
    "supported", which runs far slower than fp16 on older GPUs."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument counted only native support
        return torch.cuda.is_bf16_supported()


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast is supported natively, so worth using, on this device."""
    if device.type == "cuda":
        return cuda_has_native_bf16()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return device.type == "mps"


def supports_fp16(device: torch.device) -> bool:
    return device.type in ("cuda", "mps")


def attention_backend(device: torch.device, dtype: torch.dtype, head_dim: int, n_heads: int = 2,
                      n_kv_heads: int | None = None) -> str:
    """The fastest SDPA kernel that accepts the model's causal attention on this device.

    The probe has the model's query and key/value head counts and passes `enable_gqa` as the model
    does: not every fused kernel takes grouped-query attention, so a probe with equal head counts
    can name a kernel the model never gets.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n_kv_heads = n_kv_heads or n_heads
    q = torch.randn(1, n_heads, 16, head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, n_kv_heads, 16, head_dim, device=device, dtype=dtype)
    for backend, label in ((SDPBackend.FLASH_ATTENTION, "flash"),
                           (SDPBackend.EFFICIENT_ATTENTION, "memory-efficient"),
                           (SDPBackend.CUDNN_ATTENTION, "cudnn"),
                           (SDPBackend.MATH, "math (unfused)")):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=n_kv_heads != n_heads)
            return label
        except RuntimeError:
            continue
    return "none"

