"""Decoding speed: our KV-cache loop (fp32, bf16, int8 weights) against transformers' `generate` and
llama.cpp (llama-cpp-python on our own GGUF export, f32 / f16 / q8_0) on the same weights.

Every candidate decodes greedily from the same prompts for the same number of new tokens, on the same
threads; the candidates of one (model, batch) are timed in turns (A B C ... then reversed), repeated,
and the medians and the ratios between them are printed, so load on a shared machine hits all alike.
Tokens are compared with our fp32 output (with the first candidate's when fp32 is not run): `agree` is
the share of new tokens before each row's first difference (1.00 = identical; bf16 / int8 / f16 / q8_0
round differently, so they may drift apart).
llama-cpp-python's high-level API decodes one sequence, so llama.cpp runs at batch 1 only.
Ours is the model as `prepare_model` makes it for inference (every precision, fp32 included), whose
one-token steps take the lean decode step (`inference/fast_step.py`; `--ours int8-forward` and the
like turn it off; `--ours int8-compiled` and the like run the steps (up to 16 rows) as one compiled graph,
`inference/compiled_step.py`, compiled during the warm-up, its time printed). int8 on an x86 CPU is an
int8 x int8 product with fp32 elsewhere: our kernel where the CPU has AVX512-VNNI (`inference/int8_kernel.py`,
each activation row quantized on its own), fbgemm's dynamic int8 product otherwise and for `int8-fbgemm`. bf16
decode products run our bf16 kernel where the CPU has AVX512-BF16 (`inference/bf16_kernel.py`), oneDNN's
otherwise and for `bf16-onednn`.

    .venv/bin/python benchmarks/decode_speed.py                       # nano and tiny, batch 1 and 8
    .venv/bin/python benchmarks/decode_speed.py --checkpoint runs/demo/run --presets nano
    .venv/bin/python benchmarks/decode_speed.py --quick               # a smoke run of a few seconds

Without --checkpoint the weights are random (a larger init scale keeps a random model from repeating
one token, so the token comparison sees varied output); tiny uses GPT-2's tokenizer files from
../shared/data/gpt2 for its GGUF export, nano a 4,096-token BPE trained on the built-in corpus.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cogni_mamba.config import Config, GenerationConfig, preset  # noqa: E402
from cogni_mamba.generate import decode_n  # noqa: E402
from cogni_mamba.inference.bf16_kernel import onednn_instead  # noqa: E402
from cogni_mamba.inference.int8_kernel import fbgemm_instead  # noqa: E402
from cogni_mamba.inference.precision import prepare_model  # noqa: E402
from cogni_mamba.model import CogniMamba  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
OURS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
        "int8-fbgemm": (torch.bfloat16, "int8"),  # the same int8 weights on fbgemm's product, not our kernel
        "bf16-onednn": (torch.bfloat16, None)}  # bf16 on oneDNN's product, not our bf16 kernel
# "-forward": the same weights with the lean decode step turned off (every step through the model's forward);
# "-compiled": steps of up to 16 rows through the compiled graph (`prepare_model(..., compile=True)`)
VARIANTS = [*OURS, *(f"{name}-forward" for name in OURS), *(f"{name}-compiled" for name in OURS)]


def prepared(model: CogniMamba, variant: str) -> CogniMamba:
    """`model` as `prepare_model` makes it for one of VARIANTS."""
    name = variant.removesuffix("-forward").removesuffix("-compiled")
    dtype, quantize = OURS[name]
    with fbgemm_instead(name == "int8-fbgemm"), onednn_instead(name == "bf16-onednn"):
        return prepare_model(model, dtype, quantize=quantize, fast_decode=not variant.endswith("-forward"),
                             compile=variant.endswith("-compiled"))
GPT2_FILES = REPO.parent / "shared" / "data" / "gpt2"


@dataclasses.dataclass
class Subject:
    """One model to decode with: its fp32 weights, config and (for GGUF export) tokenizer."""

    name: str
    model: CogniMamba
    config: Config
    tokenizer: object | None
    note: str = ""


# --- the models ----------------------------------------------------------------------------------

def random_subject(name: str, *, with_tokenizer: bool) -> Subject:
    cfg = preset(name)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_std=0.3))
    torch.manual_seed(0)
    model = CogniMamba(cfg.model).eval()
    tokenizer, note = (subject_tokenizer(cfg) if with_tokenizer else (None, "no tokenizer asked for"))
    return Subject(name, model, cfg, tokenizer, note)


def subject_tokenizer(cfg: Config):
    """A tokenizer of the model's vocabulary size with BPE merges (llama.cpp needs them), or (None, why)."""
    from cogni_mamba.tokenizer import load_tokenizer, train_bpe

    if cfg.model.vocab_size == 50304:
        if not GPT2_FILES.is_dir():
            return None, f"GPT-2 tokenizer files not found at {GPT2_FILES}"
        return load_tokenizer(GPT2_FILES), ""
    from cogni_mamba.corpus import CorpusSpec, bpe_text, corpus_documents

    texts = [bpe_text(d) for d in corpus_documents(CorpusSpec(size=1_500_000, seed=0))]
    return train_bpe(texts, cfg.model.vocab_size, progress=False), ""


def checkpoint_subject(path: str) -> Subject:
    from cogni_mamba.checkpoint import load_checkpoint_full

    model, tokenizer, cfg = load_checkpoint_full(path)
    return Subject(f"{cfg.preset or 'checkpoint'} ({path})", model.float().eval(), cfg, tokenizer)


# --- the decoders: each takes (B, T) prompt ids and returns (B, n) new ids -------------------------

def ours(model: CogniMamba, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    settings = GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=n)

    def run(prompt: torch.Tensor) -> torch.Tensor:
        return torch.tensor(list(decode_n(model, prompt.tolist(), settings))).T

    return run


def transformers_generate(hf, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(prompt: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, eos_token_id=None, pad_token_id=0)
        return out[:, prompt.shape[1]:]

    return run


def llama_cpp_generate(llm, n: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(prompt: torch.Tensor) -> torch.Tensor:
        rows = []
        for ids in prompt.tolist():  # one sequence at a time (the binding's generate decodes one)
            out = []
            llm.reset()  # otherwise the binding reuses the cached prompt prefix of the previous run
            for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
                out.append(token)
                if len(out) == n:
                    break
            rows.append(out)
        return torch.tensor(rows)

    return run


def load_llama(subject: Subject, dtype: str, directory: Path, n_ctx: int, threads: int):
    """Our GGUF export of the subject in `dtype`, loaded by llama-cpp-python; or (None, why not)."""
    try:
        import llama_cpp
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if subject.tokenizer is None:
        return None, subject.note or "no tokenizer for the GGUF export"
    from cogni_mamba.export import export_gguf

    path = directory / f"{subject.config.preset or 'model'}-{dtype}.gguf"
    if not path.exists():
        export_gguf(subject.model, subject.tokenizer, subject.config, path, dtype=dtype)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                              seed=0)
    return llm, ""


# --- timing and agreement --------------------------------------------------------------------------

def agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean share of each row's new tokens before its first difference from the reference."""
    shares = []
    for a, b in zip(reference.tolist(), other.tolist(), strict=True):
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        shares.append(first / len(a))
    return sum(shares) / len(shares)


def alternate(candidates: dict[str, Callable[[], object]], repeats: int, clock: str) -> dict[str, float]:
    """Median seconds per candidate, timed in turns (order reversed on odd rounds)."""
    now = CLOCKS[clock]
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = now()
            candidates[name]()
            times[name].append(now() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def prompts(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """(batch, length) random ids, avoiding the first 262 (special tokens of our tokenizers live there)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(262, vocab, (batch, length), generator=g)


def bench_subject(subject: Subject, args, directory: Path) -> list[dict]:
    from cogni_mamba.export import to_transformers

    n, threads = args.new_tokens, torch.get_num_threads()
    vocab = subject.tokenizer.vocab_size if subject.tokenizer is not None else subject.config.model.vocab_size
    decoders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    compiled = {}
    for variant in args.ours:
        model = prepared(_copy(subject.model), variant)
        decoders[f"ours {variant}"] = ours(model, n)
        if variant.endswith("-compiled"):
            compiled[variant] = model.fast_decode
    skipped = {}
    if not args.no_transformers:
        decoders["transformers fp32"] = transformers_generate(to_transformers(subject.model).eval(), n)
    llamas = {}
    for dtype in args.llama:
        llm, why = load_llama(subject, dtype, directory, args.prompt_tokens + n + 8, threads)
        if llm is None:
            skipped[f"llama.cpp {dtype}"] = why
        else:
            llamas[f"llama.cpp {dtype}"] = llama_cpp_generate(llm, n)
    rows = []
    for batch in args.batch:
        prompt = prompts(min(vocab, subject.config.model.vocab_size), batch, args.prompt_tokens, seed=batch)
        here = dict(decoders)
        if batch == 1:
            here.update(llamas)
        outputs = {name: fn(prompt) for name, fn in here.items()}  # also the warm-up
        for variant, decoder in compiled.items():
            if decoder.failed:
                print(f"ours {variant}: not compiled ({decoder.failed}); it ran the eager step")
            elif decoder.compile_seconds is not None and batch == 1:
                how = "loaded its package (compiled by an earlier run)" if decoder.loaded else "compiled"
                print(f"ours {variant}: {how} in {decoder.compile_seconds:.1f} s (at the first step)")
        reference_name = "ours fp32" if "ours fp32" in outputs else next(iter(outputs))  # the first, without fp32
        reference = outputs[reference_name]
        seconds = alternate({name: (lambda fn=fn, prompt=prompt: fn(prompt)) for name, fn in here.items()}, args.repeats, args.clock)
        for name in here:
            rows.append({"model": subject.name, "batch": batch, "candidate": name,
                         "tok_s": batch * n / seconds[name], "agree": agreement(reference, outputs[name]),
                         "reference": reference_name})
        for name, why in skipped.items():
            if batch == 1:
                rows.append({"model": subject.name, "batch": batch, "candidate": name, "skipped": why})
    return rows


def _copy(model: CogniMamba) -> CogniMamba:
    clone = CogniMamba(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


# --- where a step's time goes ---------------------------------------------------------------------

MATMULS = ("aten::linear", "aten::mm", "aten::addmm", "aten::_weight_int8pack_mm", "quantized::linear_dynamic",
           "mkldnn::_linear_pointwise")


def profile_step(model: CogniMamba, steps: int = 50) -> dict:
    """One-token steps at batch 1 after a 16-token prompt: ms per step (CPU time, model only), the weight
    matmuls' share of the profiled op time, and op calls per step made from Python (not inside other ops)."""
    from torch.profiler import profile

    cache = model.new_cache(1, 16 + 2 * steps + 11)
    token = torch.tensor([[300]])
    with torch.inference_mode():
        model(torch.arange(300, 316)[None], cache=cache)
        for _ in range(steps):  # warm-up
            model(token, cache=cache)
        t0 = time.process_time()
        for _ in range(steps):
            model(token, cache=cache)
        ms = (time.process_time() - t0) / steps * 1e3
        profiled = 10
        with profile() as prof:
            for _ in range(profiled):
                model(token, cache=cache)
    ops = [e for e in prof.events() if "::" in e.name]
    top = [e for e in ops if e.cpu_parent is None or "::" not in e.cpu_parent.name]
    total = sum(e.self_cpu_time_total for e in ops)
    matmul = sum(e.cpu_time_total for e in top if e.name in MATMULS)
    return {"ms": ms, "matmul_share": matmul / total, "calls": len(top) // profiled}


def print_profiles(subjects: list[Subject], variants: list[str]) -> None:
    print("\n| model | ours | ms per step (model only) | weight matmuls' share | op calls per step |")
    print("|---|---|---|---|---|")
    for subject in subjects:
        for variant in variants:
            r = profile_step(prepared(_copy(subject.model), variant))
            print(f"| {subject.config.preset} | {variant} | {r['ms']:.2f} | {r['matmul_share']:.0%} | {r['calls']} |")


# --- report ----------------------------------------------------------------------------------------

def print_rows(rows: list[dict], markdown: bool) -> None:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["batch"]), []).append(r)
    for (model, batch), group in groups.items():
        timed = [r for r in group if "tok_s" in r]
        hf = next((r["tok_s"] for r in timed if r["candidate"].startswith("transformers")), None)
        llama = [r for r in timed if r["candidate"].startswith("llama.cpp")]
        best_llama = max(llama, key=lambda r: r["tok_s"]) if llama else None
        print(f"\n{model}, batch {batch}" + (f" (llama.cpp best: {best_llama['candidate']})" if best_llama else ""))
        reference = next((r["reference"] for r in timed), "ours fp32")
        head = ["candidate", "tok/s", "x transformers", "x llama.cpp best", f"agree with {reference}"]
        lines = []
        for r in group:
            if "skipped" in r:
                lines.append([r["candidate"], "skipped", "", "", r["skipped"]])
                continue
            lines.append([r["candidate"], f"{r['tok_s']:,.0f}", f"{r['tok_s'] / hf:.2f}x" if hf else "-",
                          f"{r['tok_s'] / best_llama['tok_s']:.2f}x" if best_llama else "-", f"{r['agree']:.2f}"])
        if markdown:
            print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            for line in lines:
                print("| " + " | ".join(line) + " |")
        else:
            print(f"{head[0]:<20} {head[1]:>9} {head[2]:>15} {head[3]:>17} {head[4]:>21}")
            for line in lines:
                print(f"{line[0]:<20} {line[1]:>9} {line[2]:>15} {line[3]:>17} {line[4]:>21}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint or run directory, used instead of random weights of its preset")
    p.add_argument("--presets", nargs="+", default=["nano", "tiny"])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, help="new tokens per row (default 200 at nano, 100 otherwise)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (default 1)")
    p.add_argument("--clock", choices=list(CLOCKS), default="cpu",
                   help="cpu: the process's CPU time, steady on a shared machine with one thread (default); wall")
    p.add_argument("--ours", nargs="+", choices=VARIANTS, default=list(OURS),
                   help="our variants (default fp32 bf16 int8); NAME-forward runs NAME without the lean decode step, "
                        "NAME-compiled with the compiled step")
    p.add_argument("--llama", nargs="*", choices=["f32", "f16", "q8_0"], default=["f32", "f16", "q8_0"])
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the tables as markdown")
    p.add_argument("--quick", action="store_true", help="a smoke run: nano, 8 new tokens, one repeat, no llama.cpp")
    p.add_argument("--profile", action="store_true",
                   help="instead of the race: where one step of each of our variants spends its time (batch 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.repeats, args.llama, args.batch = ["nano"], 1, [], [1, 2]
        args.new_tokens = args.new_tokens or 8
    torch.set_num_threads(args.threads)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), clock {args.clock}, load average "
          f"{load:.2f}; greedy, {args.prompt_tokens}-token prompts, medians of {args.repeats} alternated runs")
    rows = []
    if args.profile:
        subjects = ([checkpoint_subject(args.checkpoint)] if args.checkpoint else
                    [random_subject(name, with_tokenizer=False) for name in args.presets])
        return print_profiles(subjects, args.ours)
    with tempfile.TemporaryDirectory() as tmp:
        subjects = ([checkpoint_subject(args.checkpoint)] if args.checkpoint else
                    [random_subject(name, with_tokenizer=bool(args.llama)) for name in args.presets])
        for subject in subjects:
            new = args.new_tokens or (200 if subject.config.model.n_layers <= 4 else 100)
            sub_args = argparse.Namespace(**{**vars(args), "new_tokens": new})
            print(f"{subject.name}: {subject.model.num_parameters() / 1e6:.1f}M parameters, {new} new tokens")
            rows += bench_subject(subject, sub_args, Path(tmp))
    print_rows(rows, args.markdown)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at the end: {load:.2f}")


if __name__ == "__main__":
    main()
