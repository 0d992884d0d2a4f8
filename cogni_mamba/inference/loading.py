"""Loading a checkpoint for inference: weights in the dtype the hardware runs best (no import of train/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_checkpoint_full
from ..config import Config
from .precision import prepare_model, resolve_inference_dtype

DTYPE_CHOICES = ("auto", "bf16", "fp32")


def load_model_for_inference(path: str | Path, device: str | torch.device = "cpu", dtype: str = "auto", *,
                             quantize: str | None = None, compile: bool = False) -> tuple[nn.Module, Any, Config]:
    """(model in eval mode in its inference dtype, tokenizer or None, Config) from a checkpoint or run directory.

    dtype "auto" is bf16 where the device computes it natively (CPUs with AVX512-BF16 / AMX, CUDA GPUs
    with bf16) and fp32 elsewhere; "fp32" keeps the exact weights. quantize="int8", and `compile` (one-row
    decode steps as one compiled graph): see `prepare_model`.
    """
    torch_dtype = resolve_inference_dtype(dtype, device)  # a bad name fails before the weights load
    model, tokenizer, config = load_checkpoint_full(path, device)
    return prepare_model(model, torch_dtype, quantize=quantize, compile=compile), tokenizer, config
