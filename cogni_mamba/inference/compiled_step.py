"""A compiled one-token decode step for up to 16 rows (CPU): the lean step as one graph.

At nano size the eager step is op-overhead bound (~150 op calls of a few microseconds each, and
fbgemm's int8 product costs ~20 us a call); a graph that inductor compiles to C++
(no Python between the kernels) removes that overhead. The step is written as a pure
function of tensors, so one graph serves every position:

- inputs: one token per row (B,), each row's position (B,), and the KV cache's keys and values for rows
  0..B-1, (n_layers, B, n_kv_heads, S, head_dim), read only (S: the slots any row has filled, rounded up
  to 32; copied out of a cache that holds more, since the graph reads contiguous tensors);
- each row attends to its own slots before its position (a mask) plus its new key, in fp32; the new keys
  and values come out of the graph and are written in two ops after it (a write into the cache inside the
  graph made inductor copy the whole cache input once per layer);
- the rest is `FastDecoder`'s step: fused q/k/v and gate/up, the norms' weights folded into them
  (norm eps dropped), rotary from tables.

Weights: with int8 (`prepare_model(..., quantize="int8")`) the graph calls the product the eager layers
run, our kernel (`int8_kernel.py`, a custom op the compiled code reaches through torch's dispatcher) on
fp32 activations, where the CPU has AVX512-VNNI; elsewhere it multiplies bf16 activations by the same int8
rows and per-row scales (`torch._weight_int8pack_mm`, weight-only: no activation quantization). bf16 weights
take our bf16 kernel (`bf16_kernel.py`, the eager step's product) where the CPU has AVX512-BF16.
Otherwise plain products in the model's dtype, with inductor's freezing (bf16 weights packed once for oneDNN).

`CompiledDecoder` wraps the model's `FastDecoder`: steps of up to MAX_ROWS rows from row 0 of a cache (a
lone generation, or the engine's whole decoding block; at most MAX_ATTENDED filled slots in all) go through
the graph, every other step through the eager lean step. The graph is compiled ahead of time (AOTInductor: exported with the rows and slots as
dynamic sizes, so one package serves every batch and cache) at the first such step and kept on disk under a
digest of the weights, so a later process loads it in milliseconds; AOTInductor's runner also skips
torch.compile's per-call guards (0.44 against 0.58 ms a nano step). Nano bf16, one thread: 2.1x the eager
step at 1 row, 1.8-2.3x at 4 and 8 rows of different lengths (benchmarks/RESULTS.md, session 7).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CogniError, build_failure


class StaticStep(nn.Module):
    """step(ids (B,), pos (B,), keys, values) -> (logits (B, V), or the final hidden states (B, dim) when the head
    runs outside (`head=False`); the new keys and values (L, B, Hkv, D) for each row's slot `pos[b]`).
    keys/values are (L, R >= B, Hkv, S, D); row b's slots before pos[b] are attended to, none is written."""

    def __init__(self, decoder, *, head: bool = True):
        super().__init__()
        model = decoder.model
        cfg = model.config
        self.H, self.Hkv, self.D, self.ffn_dim, self.n_layers = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                                                                 cfg.ffn_dim, cfg.n_layers)
        self.int8 = model.output.weight.dtype == torch.int8  # precision.Int8Linear (not imported: no import cycle)
        self.head = head
        linears = {"head": model.output} if head else {}
        for i, (block, fused) in enumerate(zip(model.layers, decoder.fused, strict=True)):
            linears.update({f"qkv{i}": fused["qkv"], f"wo{i}": block.attention.wo, f"w13{i}": fused["w13"],
                            f"w2{i}": block.feed_forward.w2})
        # int8 on our kernel (int8_kernel.py; the layers hold its packed weights): the graph calls it on fp32
        # activations; other int8 layers run the weight-only product on bf16 activations
        self.vnni = self.int8 and all(getattr(linear, "vnni", None) is not None for linear in linears.values())
        # bf16 on our kernel (bf16_kernel.py; PackedLinear holds its packed weights): at most 16 rows, every product
        self.ours = not self.int8 and all(getattr(linear, "ours", None) is not None for linear in linears.values())
        self.dtype = decoder.dtype  # the activations'
        if self.int8:
            self.dtype = torch.float32 if self.vnni else torch.bfloat16
        self.out_features = {name: linear.out_features for name, linear in linears.items()}
        for name, linear in linears.items():
            if self.vnni:
                for part, tensor in zip(("_packed", "_sums", "_scale"), linear.vnni, strict=True):
                    self.register_buffer(name + part, tensor, persistent=False)
            elif self.int8:
                self.register_buffer(name + "_w", linear.weight, persistent=False)
                self.register_buffer(name + "_scale", linear.scale.to(self.dtype), persistent=False)
            elif self.ours:
                self.register_buffer(name + "_ours", linear.ours, persistent=False)
            else:
                self.register_buffer(name + "_w", linear.weight.detach(), persistent=False)
        self.exact = decoder.exact  # fp32 without int8: the norms' weights are not folded into the products
        if self.exact:
            root = cfg.dim ** 0.5
            for i, block in enumerate(model.layers):
                self.register_buffer(f"an{i}", (block.attention_norm.weight.detach() * root).to(self.dtype),
                                     persistent=False)
                self.register_buffer(f"fn{i}", (block.ffn_norm.weight.detach() * root).to(self.dtype),
                                     persistent=False)
        self.register_buffer("embedding", model.tok_embeddings.weight.detach().to(self.dtype), persistent=False)
        self.register_buffer("final", decoder.norm_scale.to(self.dtype), persistent=False)
        self.register_buffer("cos", decoder.cos.to(self.dtype), persistent=False)
        self.register_buffer("sin", decoder.sin.to(self.dtype), persistent=False)

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.vnni:
            return torch.ops.cogni_mamba.int8_linear(x, getattr(self, name + "_packed"), getattr(self, name + "_sums"),
                                                     getattr(self, name + "_scale"), self.out_features[name])
        if self.int8:
            return torch._weight_int8pack_mm(x, getattr(self, name + "_w"), getattr(self, name + "_scale"))
        if self.ours:
            return torch.ops.cogni_mamba_bf16.bf16_linear(x, getattr(self, name + "_ours"), self.out_features[name])
        return F.linear(x, getattr(self, name + "_w"))

    def _norm(self, x: torch.Tensor, layer: int, which: str) -> torch.Tensor:
        """x / ||x||, times the norm's weight (times sqrt(dim)) where it is not folded into the next product."""
        x32 = x.float()
        x = (x32 / torch.linalg.vector_norm(x32, dim=-1, keepdim=True).clamp_min(1e-30)).to(x.dtype)
        return x * getattr(self, f"{which}{layer}") if self.exact and which else x

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        H, Hkv, D = self.H, self.Hkv, self.D
        B, S = ids.shape[0], keys.shape[3]
        x = F.embedding(ids, self.embedding)  # (B, dim)
        cos, sin = self.cos[pos].view(B, 1, D), self.sin[pos].view(B, 1, D)
        earlier = (torch.arange(S, device=ids.device)[None, :] < pos[:, None]).view(B, 1, 1, S)  # rows' filled slots
        new_keys, new_values = [], []
        for i in range(self.n_layers):
            qkv = self._linear(f"qkv{i}", self._norm(x, i, "an")).view(B, H + 2 * Hkv, D)
            qk = qkv[:, :H + Hkv]
            qk = qk * cos + qk.view(B, H + Hkv, 2, D // 2).flip(2).view(B, H + Hkv, D) * sin
            k_new, v_new = qk[:, H:].to(keys.dtype), qkv[:, H + Hkv:].to(values.dtype)  # (B, Hkv, D)
            new_keys.append(k_new)
            new_values.append(v_new)
            # attention over the cached slots and the new key, which the caller writes at `pos` afterwards
            # (written inside the graph, the cache input's mutation costs a copy of it per layer)
            q = qk[:, :H].float().view(B, Hkv, H // Hkv, D)
            k_rows, v_rows = keys[i, :B].float(), values[i, :B].float()  # (B, Hkv, S, D)
            scores = torch.cat([(q @ k_rows.transpose(-1, -2)).masked_fill(~earlier, float("-inf")),
                                (q * k_new.float()[:, :, None]).sum(-1, keepdim=True)], dim=-1) * D ** -0.5
            probs = torch.softmax(scores, dim=-1)  # (B, Hkv, G, S + 1)
            y = probs[..., :S] @ v_rows + probs[..., S:] * v_new.float()[:, :, None]
            x = x + self._linear(f"wo{i}", y.to(x.dtype).reshape(B, H * D))
            gate_up = self._linear(f"w13{i}", self._norm(x, i, "fn"))
            x = x + self._linear(f"w2{i}", F.silu(gate_up[:, :self.ffn_dim]) * gate_up[:, self.ffn_dim:])
        x = self._norm(x, 0, "") * self.final
        return self._linear("head", x) if self.head else x, torch.stack(new_keys), torch.stack(new_values)


def build_now(model) -> None:
    """When `model.fast_decode` is a CompiledDecoder (`--compile`): build (or load) its graph now, saying so on
    stderr when it builds, so the wait comes before the first prompt rather than inside its reply."""
    decoder = getattr(model, "fast_decode", None)
    if isinstance(decoder, CompiledDecoder):
        decoder.ready(announce=lambda sentence: print(sentence, file=sys.stderr, flush=True))


def compile_unavailable(device: torch.device) -> str | None:
    """Why the compiled step cannot run here (one sentence), or None when it can."""
    if device.type != "cpu":
        return f"the compiled decode step is built for CPUs (and replayed as CUDA graphs on GPUs), not {device.type}"
    from torch._inductor import config as inductor

    compiler = inductor.cpp.cxx[1] if isinstance(inductor.cpp.cxx, tuple) else inductor.cpp.cxx
    if shutil.which(compiler or "g++") is None:
        return f"no C++ compiler ({compiler or 'g++'}) was found on PATH, which torch.compile needs on a CPU"
    return None


def package_dir() -> Path:
    """Where compiled steps are kept: $COGNI_MAMBA_CACHE/compiled, else ~/.cache/cogni-mamba/compiled."""
    root = os.environ.get("COGNI_MAMBA_CACHE") or Path.home() / ".cache" / "cogni-mamba"
    return Path(root) / "compiled"


def package_key(step: StaticStep) -> str:
    """A digest of everything the compiled code depends on: torch, this file, the shapes and the weights."""
    digest = hashlib.sha256(f"{torch.__version__}|{STEP_VERSION}|{step.int8}|{step.vnni}|{step.ours}|{step.head}|"
                            f"{step.exact}|{step.dtype}|{step.H}|{step.Hkv}|{step.D}|{step.ffn_dim}|{step.n_layers}".encode())
    for name, buffer in sorted(step.named_buffers()):
        digest.update(f"{name}{tuple(buffer.shape)}{buffer.dtype}".encode())
        digest.update(buffer.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def package_bytes(step: StaticStep) -> int:
    """A generous estimate of the disk a package takes while it is built: its weights twice, and 32 MiB of code
    (measured: 10-12 MB for nano, 231 MB for tiny's 152 MB of bf16 weights)."""
    return 2 * sum(b.numel() * b.element_size() for b in step.buffers()) + (32 << 20)


def check_space(folder: Path, need: int) -> None:
    """Refuse to compile (CogniError, one sentence) unless `folder` and inductor's build folder have `need` bytes
    free: on a full disk the package writer fails half-way and can abort the process as it is cleaned up."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        build = Path(cache_dir())
    except Exception:  # noqa: BLE001 - another torch: its build files go to the temporary folder
        build = Path(tempfile.gettempdir())
    for where in (folder, build if build.exists() else build.parent):
        free = shutil.disk_usage(where).free
        if free < need:
            raise CogniError(f"only {free / 2**20:,.0f} MB are free in {where} and compiling it needs about "
                             f"{need / 2**20:,.0f} MB; free some space or set COGNI_MAMBA_CACHE to a folder on "
                             "a larger disk")


MAX_ROWS = 16  # steps of more rows run eagerly
# and steps whose rows x filled slots pass this: the graph's attention is slower than the eager step's on many long
# rows (tiny bf16, one thread: 8 rows of 900 slots 0.79x the eager step, of 700 1.06x, of 300-500 1.04-1.24x)
MAX_ATTENDED = 4096
STEP_VERSION = 4  # raise it when StaticStep's computation changes: old packages are then not reused


def _longest(cache) -> int:
    """The most slots any row of the cache holds (an engine SlotView's rows each have a length; a KVCache's one)."""
    longest = getattr(cache, "longest", None)
    return longest if longest is not None else cache.length


class CompiledDecoder:
    """A `FastDecoder` whose steps of up to MAX_ROWS rows from a cache's row 0 run as one compiled graph
    (`StaticStep`).

    `model(ids, cache=...)` reaches it like the eager step (`model.fast_decode`); steps of more rows, of rows
    not starting at 0, or of a left-padded cache take the eager step. The graph is exported once with the
    batch, the cache's rows and slots as dynamic sizes (so one graph serves every cache of this model) and
    compiled ahead of time by
    AOTInductor into a package kept under `package_dir()`, named by a digest of the weights: the first
    step compiles it (10-60 s on one core), later processes load it in milliseconds. Where that fails,
    one warning says why and every step runs eagerly.
    """

    def __init__(self, decoder, *, head_outside: bool = False):
        self.eager = decoder
        self.model = decoder.model
        self.head = None
        if head_outside:  # e.g. fbgemm's int8 head, 3x faster than the weight-only kernel at GPT-2's vocabulary
            from .fast_step import kernel

            self.head = kernel(self.model.output)
        self.step = StaticStep(decoder, head=not head_outside)
        self.runner = None
        self._key: str | None = None
        self.failed: str | None = compile_unavailable(self.model.tok_embeddings.weight.device)
        self.compile_seconds: float | None = None  # building or loading the package, at the first step
        self.loaded: bool | None = None  # True when that package came from an earlier run

    def supports(self, cache) -> bool:
        return self.eager.supports(cache)

    def ready(self, announce: Callable[[str], None] | None = None) -> None:
        """Build (or load) the compiled step now rather than at the first step; `announce(sentence)` is called
        before a build (not a load), which takes 10-60 s. Failures fall back to the eager step as usual."""
        if self.runner is not None or self.failed:
            return
        if announce is not None and not self._path().is_file():
            announce("Compiling the decode step for these weights (once: 10-60 s; later starts load it)...")
        t0 = time.perf_counter()
        try:
            self.runner = self._package(self.model.new_cache(1, 16))
        except Exception as error:  # noqa: BLE001 - as in __call__: eager from now on
            self._give_up(error)
            return
        self.compile_seconds = time.perf_counter() - t0

    def __getattr__(self, name: str):
        """Everything else (`exact`, `prefill`, ...) is the eager FastDecoder's."""
        if name == "eager":  # not set yet (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.eager, name)

    def _takes(self, ids: torch.Tensor, cache) -> bool:
        """Whether this step runs the graph: up to MAX_ROWS rows from a cache's row 0, no left padding, at most
        MAX_ATTENDED filled slots in all."""
        if ids.shape[0] > MAX_ROWS or self.failed:
            return False
        start = getattr(cache, "start", 0)
        return (start == 0 and getattr(cache, "pad", None) is None and cache.k.dtype == self.eager.dtype
                and ids.shape[0] * _longest(cache) <= MAX_ATTENDED)

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        if not self._takes(ids, cache):
            return self.eager(ids, cache)
        B = ids.shape[0]
        # the graph reads its inputs as contiguous tensors: a KVCache's one shared position is repeated per row
        pos = cache.positions(1).view(-1).expand(B).contiguous()  # refuses a full cache
        try:
            if self.runner is None:
                t0 = time.perf_counter()
                self.runner = self._package(cache)
                self.compile_seconds = time.perf_counter() - t0
            # the graph reads contiguous keys and values: these rows' filled slots (rounded up), copied when the
            # cache holds more (cheaper than attending to every slot of a long context)
            used = min(cache.k.shape[3], -(-(_longest(cache) + 1) // 32) * 32)
            keys, values = (c[:, :B, :, :used].contiguous() for c in (cache.k, cache.v))
            out, k, v = self.runner(ids.reshape(B).contiguous(), pos, keys, values)
        except Exception as error:  # noqa: BLE001 - no compiler, an unsupported op: any failure means eager
            self._give_up(error)
            return self.eager(ids, cache)
        rows = torch.arange(B, device=pos.device)
        cache.k[:, rows, :, pos] = k.transpose(0, 1)  # (B, L, Hkv, D): row b's new keys at its slot pos[b]
        cache.v[:, rows, :, pos] = v.transpose(0, 1)
        cache.advance(1)
        if self.head is not None:
            out = self.head(out.to(self.eager.dtype))
        return out.view(B, 1, -1).to(self.eager.dtype)

    def _path(self) -> Path:
        if self._key is None:  # a digest of every weight: computed once
            self._key = package_key(self.step)
        return package_dir() / f"step-{self._key}.pt2"

    def _package(self, cache):
        """The loaded AOTInductor package for this step: from package_dir() when there, else built and saved."""
        import torch._inductor  # noqa: F401  (aoti_load_package, aoti_compile_and_package)

        path = self._path()
        if path.is_file():
            try:
                runner = torch._inductor.aoti_load_package(str(path))
                self.loaded = True
                return runner
            except Exception:  # noqa: BLE001 - a damaged or foreign package: build it again
                pass
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            target = path
        except OSError:  # no writable cache: compile into a temporary folder for this process only
            target = Path(tempfile.mkdtemp(prefix="cogni-mamba-")) / path.name
        check_space(target.parent, package_bytes(self.step))
        L, _, Hkv, _, D = cache.k.shape
        example = torch.zeros(L, 3, Hkv, 16, D, dtype=cache.k.dtype)  # 3 rows, 16 slots: no size specialized
        batch = torch.export.Dim("batch", min=1, max=MAX_ROWS)
        rows = torch.export.Dim("rows", min=1, max=1 << 16)
        slots = torch.export.Dim("slots", min=2, max=self.eager.cos.shape[0])
        ids = torch.zeros(2, dtype=torch.long)
        partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.pt2")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # export's and inductor's deprecation notes are not the user's business
            exported = torch.export.export(self.step, (ids, ids.clone(), example, example.clone()),
                                           dynamic_shapes=({0: batch}, {0: batch}, {1: rows, 3: slots},
                                                           {1: rows, 3: slots}))
            try:
                built = torch._inductor.aoti_compile_and_package(exported, package_path=str(partial),
                                                                 inductor_configs={"freezing": not self.step.int8})
            except BaseException:
                partial.unlink(missing_ok=True)  # no half-written package left taking the disk
                raise
        os.replace(built, target)  # whole or absent, even with two processes compiling at once
        self.loaded = False
        return torch._inductor.aoti_load_package(str(target))

    def _give_up(self, error: BaseException) -> None:
        self.failed = f"compiling the decode step failed ({build_failure(error)})"
        warnings.warn(f"{self.failed}; decoding runs the eager step.", stacklevel=3)
