"""Inference precision: which dtype the weights run in, and preparing a model for decoding.

`resolve_inference_dtype("auto", device)` picks bf16 where the hardware computes it natively
(CPUs with AVX512-BF16 / AMX, probed by `device.cpu_has_native_bf16`; CUDA GPUs with native bf16)
and fp32 elsewhere. `prepare_model` puts a model in eval mode with its weights in that dtype; the
KV cache follows the weights' dtype (`model.new_cache`), RMSNorm computes in fp32 whatever the
weights, and the rotary tables stay fp32 (they are cast once per forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..device import cpu_flags, cpu_has_native_bf16, cuda_has_native_bf16
from ..errors import CogniError
from . import bf16_kernel, int8_kernel

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUANTIZATIONS = ("int8",)


def resolve_inference_dtype(name: str, device) -> torch.dtype:
    """The weights' dtype for `name` ("auto", "bf16" or "fp32") on `device`."""
    device = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if _native_bf16(device) else torch.float32
    if name not in DTYPES:
        raise CogniError(f"Unknown inference dtype {name!r}; use auto, bf16 or fp32.")
    return DTYPES[name]


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_available() and cuda_has_native_bf16()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False  # MPS and others: bf16 support and speed vary too much to pick it blindly


def prepare_model(model: nn.Module, dtype: torch.dtype, *, quantize: str | None = None,
                  fast_decode: bool = True, compile: bool = False, head_outside: bool | None = None) -> nn.Module:
    """`model` in eval mode with its parameters cast to `dtype` (buffers such as the rotary tables keep
    fp32); with quantize="int8", its Linear layers hold int8 weights with one scale per output row.

    On an x86 CPU (our int8 kernel where it has AVX512-VNNI, else a torch with fbgemm), int8 runs with fp32
    activations (the rest of the weights and the KV cache in fp32, whatever `dtype` says): the int8 x int8
    product is the fast one there.
    With `fast_decode`, one-token steps go through a `FastDecoder` (fused q/k/v and gate/up weights,
    fewer ops; `model.fast_decode = None` turns it off). For inference only: the packed and fused
    weights are copies, so weights changed afterwards (training, load_state_dict) would not reach them.
    With `compile` (CPU, needs a C++ compiler), steps of up to 16 rows run as one compiled graph
    (`inference/compiled_step.py`, `CompiledDecoder`; compiled at the first such step, eager where it cannot
    be); with int8 the graph multiplies bf16 activations by the int8 weights (weight-only). On a CUDA GPU,
    `compile` replays steps of up to 64 rows as CUDA graphs instead (`inference/cuda_graphs.py`).
    `head_outside` (default: decided by size) keeps the output layer's product out of that graph.
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise CogniError(f"Unknown quantization {quantize!r}; use int8 or leave it unset.")
    if quantize == "int8" and not _on_cpu(model):
        raise CogniError(f"int8 weights run on CPUs only (their products are CPU kernels), not on "
                         f"{next(model.parameters()).device.type}; leave out --int8 there (bf16, the default on "
                         "GPUs with native bf16, is the fast choice).")
    if quantize == "int8" and _on_cpu(model) and int8_takes_fp32():
        dtype = torch.float32
    model.eval()
    for param in model.parameters():  # tied weights are one Parameter: cast once
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    decoder = None
    if fast_decode and hasattr(model, "fast_decode"):
        from .fast_step import FastDecoder

        decoder = FastDecoder(model, exact=dtype == torch.float32 and quantize is None)
    for part in (model, decoder.fused) if decoder is not None else (model,):
        if quantize == "int8":
            quantize_int8(part)
        elif dtype == torch.bfloat16 and _on_cpu(model) and torch.backends.mkldnn.is_available():
            pack_linears(part)
    if compile and decoder is not None and model.tok_embeddings.weight.device.type == "cuda":
        from .cuda_graphs import GraphedDecoder

        decoder = GraphedDecoder(decoder)
    elif compile and decoder is not None:
        from .compiled_step import CompiledDecoder

        # int8 on fbgemm: the graph cannot call fbgemm, and its weight-only product is slower at large sizes
        fbgemm = quantize == "int8" and dtype == torch.float32 and getattr(model.output, "vnni", None) is None
        if head_outside is None:
            head_outside = fbgemm and _head_is_large(model)
        decoder = CompiledDecoder(decoder, head_outside=head_outside)
        body = _body_weights(model)
        if fbgemm and decoder.failed is None and body > COMPILED_INT8_MAX_WEIGHTS:
            decoder.failed = (f"this model has {body / 1e6:.0f}M int8 weights in its blocks, and above "
                              f"{COMPILED_INT8_MAX_WEIGHTS / 1e6:.0f}M fbgemm's eager int8 product is faster than the "
                              "compiled step's weight-only one")
        if decoder.failed:
            import warnings

            warnings.warn(f"Not compiling: {decoder.failed}; decoding runs the eager step.", stacklevel=2)
    if hasattr(model, "fast_decode"):
        model.fast_decode = decoder
    return model


def weights_label(model: nn.Module) -> str:
    """What a prepared model's weights are, for people: "int8" for int8 layers, else the dtype ("bfloat16", ...)."""
    if isinstance(getattr(model, "output", None), Int8Linear):
        return "int8"
    return str(model.tok_embeddings.weight.dtype).removeprefix("torch.")


# Above this many int8 weights per step (the head aside when it runs outside), fbgemm's eager product, ~4x
# faster per weight than the graph's weight-only one at GPT-2 sizes, wins: measured 0.55 vs 0.77 ms a step at
# nano (3.4M weights), 10.8 vs 5.6 ms at tiny (85M; benchmarks/RESULTS.md).
COMPILED_INT8_MAX_WEIGHTS = 16_000_000


def _body_weights(model: nn.Module) -> int:
    """Weights of the transformer blocks' linear layers (not the embedding or the head)."""
    return sum(m.weight.numel() for block in model.layers for m in block.modules() if hasattr(m, "out_features"))


def _head_is_large(model: nn.Module) -> bool:
    """An output layer of 8M+ weights: fbgemm's eager int8 product beats the graph's weight-only one there."""
    return model.config.vocab_size * model.config.dim >= 8 * 2**20


def _on_cpu(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


class PackedLinear(nn.Module):
    """A bias-free bf16 Linear whose weight oneDNN has reordered once, ahead of time (CPU only).

    F.linear on bf16 reorders the weight into oneDNN's blocked layout on every call; doing it once made
    the matmuls of one decoding step 1.3-2.5x faster on an AVX512-BF16 CPU (nano to GPT-2-head sizes,
    batch 1 and 8), with the same results. The plain weight is kept too (the tied embedding reads it).
    Where our bf16 kernel runs (`bf16_kernel`), products of up to `bf16_kernel.max_rows` rows (decode steps)
    take it instead: 1.6-5x faster than oneDNN's at one row, on a copy of the weight in its own order.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # the Parameter itself: tying and state_dict stay as they were
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None),
                             persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        ours = self.in_features % 2 == 0 and bf16_kernel.available()
        self.register_buffer("ours", bf16_kernel.pack(linear.weight.detach()) if ours else None, persistent=False)
        self.ours_rows = bf16_kernel.max_rows(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return F.linear(x, self.weight)
        return self.kernel()(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)

    def kernel(self):
        """The product for 2-D bf16 inputs as a plain function (the lean decode step calls it directly): ours up to
        `ours_rows` rows where it runs, else oneDNN's."""
        packed, op = self.packed, torch.ops.mkldnn._linear_pointwise
        if self.ours is None:
            return lambda x: op(x, packed, None, "none", [], "")
        ours, n, limit, product = self.ours, self.out_features, self.ours_rows, bf16_kernel.linear
        return lambda x: product(x, ours, n) if x.shape[0] <= limit else op(x, packed, None, "none", [], "")


def pack_linears(model: nn.Module) -> nn.Module:
    """Replace every bias-free bf16 nn.Linear of `model` (in place) with a PackedLinear."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and child.weight.dtype == torch.bfloat16:
                setattr(module, name, PackedLinear(child))
    return model


class Int8Linear(nn.Module):
    """A bias-free Linear with int8 weights and a per-output-row scale.

    fp32 activations on a CPU run an int8 x int8 product: our own kernel where the CPU has AVX512-VNNI
    (`int8_kernel`: each input row quantized to 8 bits over its own range), else fbgemm's dynamic int8
    kernel where this torch has it (x86: one scale for the whole (rows x features) input); both are 2-3x
    faster than the bf16 x int8 product on one core. bf16 activations use torch's weight-only kernel
    (`torch._weight_int8pack_mm`: the weight dequantized, activations exact).
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if linear.bias is not None:
            raise CogniError("int8 quantization supports Linear layers without bias only.")
        w32 = linear.weight.detach().float()
        scale = (w32.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (out,)
        self._setup(torch.round(w32 / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(linear.weight.dtype))

    @classmethod
    def from_quantized(cls, weight: torch.Tensor, scale: torch.Tensor) -> Int8Linear:
        """An Int8Linear holding these int8 rows (out, in) and their scales (out,)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(weight, scale)
        return layer

    def _setup(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.out_features, self.in_features = weight.shape
        on_cpu = weight.device.type == "cpu"
        self.vnni = int8_kernel.pack(weight, scale) if on_cpu and int8_kernel.available() else None
        self.packed = _fbgemm_pack(weight, scale) if on_cpu and self.vnni is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if x.dtype == torch.float32 and self.vnni is not None:
            y = int8_kernel.linear(x.reshape(-1, shape[-1]), *self.vnni, self.out_features)
        elif x.dtype == torch.float32 and self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]), self.packed, INT8_REDUCE_RANGE)
        else:
            y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scale.to(x.dtype))
        return y.view(*shape[:-1], self.out_features)

    def kernel(self):
        """The product as a plain function (the lean decode step calls it directly)."""
        if self.vnni is not None:
            (packed, sums, scale), n, op = self.vnni, self.out_features, torch.ops.cogni_mamba.int8_linear
            return lambda x: op(x, packed, sums, scale, n) if x.dtype == torch.float32 else self(x)
        if self.packed is None:
            return self
        packed, op = self.packed, torch.ops.quantized.linear_dynamic
        return lambda x: op(x, packed, INT8_REDUCE_RANGE) if x.dtype == torch.float32 else self(x)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer stands for: (out, in)."""
        return self.weight.float() * self.scale.float()[:, None]


def _has_vnni() -> bool:
    """x86 VNNI (8-bit dot products into int32): without it fbgemm's products can saturate at full range."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


INT8_REDUCE_RANGE = not _has_vnni()  # 7-bit activations where the product could overflow (fbgemm's default)


def int8_takes_fp32() -> bool:
    """Whether int8 layers on this CPU run an int8 x int8 product on fp32 activations (ours or fbgemm's)."""
    return int8_kernel.available() or fbgemm_available()


def fbgemm_available() -> bool:
    """Whether this torch has fbgemm's (x86) dynamic int8 linear."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor):
    if not fbgemm_available():
        return None
    import warnings

    with warnings.catch_warnings():  # quantized tensors are marked deprecated, but are fbgemm's way in
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm"  # process-wide; the default "x86" engine's was 1.5x slower
        zero = torch.zeros(scale.shape, dtype=torch.long)
        q = torch._make_per_channel_quantized_tensor(weight, scale.double(), zero, 0)  # exactly these int8 rows
        return torch.ops.quantized.linear_prepack(q, None)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every bias-free nn.Linear of `model` (in place) with an Int8Linear; the embedding stays."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None:
                setattr(module, name, Int8Linear(child))
    return model
