"""Decode steps replayed as CUDA graphs (`inference.cuda_graphs`, `--compile` on a GPU).

On a CPU the graph is `CallAgain` (the step called again, its results copied into the first call's outputs),
so everything but the recording itself runs here: the static buffers, the (rows, slots) buckets, the padded
rows, the writes of the new keys and values, a new cache dropping the old graphs, the fallbacks. Each row's
greedy tokens are checked against full fp32 recomputation of its own prompt (`naive_greedy`). The last test
records real graphs on a GPU (skipped without one; `scripts/gpu_check.sh` runs the same through
`scripts/cuda_checks.py graphs`)."""

from __future__ import annotations

import warnings

import pytest
import torch

from cogni_mamba.config import GenerationConfig
from cogni_mamba.generate import decode_n
from cogni_mamba.inference import Engine, cuda_graphs
from cogni_mamba.inference.cache import SlotCache
from cogni_mamba.inference.cuda_graphs import CallAgain, GraphedDecoder, bucket_rows, bucket_slots
from cogni_mamba.inference.precision import prepare_model

from .references import naive_greedy
from .test_inference_compiled import PATTERN, _copy, _trained


def _greedy_settings(n: int) -> GenerationConfig:
    return GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=n)


class Counting:
    """CallAgain that counts its recordings and replays."""

    recorded = 0
    replays = 0

    def __init__(self, fn, pool=None):
        self.inner = CallAgain(fn, pool)
        self.outputs = self.inner.outputs
        Counting.recorded += 1

    def replay(self) -> None:
        Counting.replays += 1
        self.inner.replay()


class CountingEager:
    """The eager lean step, noting the rows of each step it runs."""

    def __init__(self, inner, log: list[int]):
        self.inner, self.log = inner, log

    def __call__(self, ids, cache):
        self.log.append(ids.shape[0])
        return self.inner(ids, cache)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def trained():
    return _trained()


def _graphed(trained, recorder=Counting) -> torch.nn.Module:
    model = prepare_model(_copy(trained), torch.float32)
    eager = model.fast_decode
    model.fast_decode = GraphedDecoder(eager, recorder=recorder)
    model.eager_steps = []  # one-token steps that ran the eager step instead of a graph
    model.fast_decode.eager = CountingEager(eager, model.eager_steps)
    Counting.recorded, Counting.replays = 0, 0
    return model


def test_buckets_by_hand():
    assert [bucket_rows(n, 64) for n in (1, 2, 3, 4, 5, 8, 9, 33)] == [1, 2, 4, 4, 8, 8, 16, 64]
    assert bucket_rows(5, 6) == 6 and bucket_rows(3, 3) == 3  # never more rows than the cache has
    step = cuda_graphs.SLOT_STEP
    assert [bucket_slots(n, 4 * step) for n in (1, step - 1, step, step + 1, 3 * step + 5)] == [step, step, step,
                                                                                                2 * step, 4 * step]
    assert bucket_slots(5, 64) == 64  # a short cache: all its slots


def test_the_engine_decodes_through_graphs_and_padded_rows_leave_the_others_alone(trained, monkeypatch):
    """Rows of different lengths decode through replayed graphs while a fourth prompt is still being prefilled
    (4 tokens a step) in the row just past them, which the 4-row bucket's padded row reads but must not write:
    every row's greedy tokens equal full fp32 recomputation of its prompt; graphs are recorded once per bucket."""
    monkeypatch.setattr(cuda_graphs, "SLOT_STEP", 8)  # several slot buckets within this model's 64 positions
    model = _graphed(trained)
    engine = Engine(model, max_batch=4, prefill_chunk=4)
    prompts = [PATTERN[:5], PATTERN[2:4], PATTERN[4:12], PATTERN[1:12]]
    lengths = [20, 12, 5, 9]
    with torch.inference_mode():
        requests = [engine.submit(p, _greedy_settings(n)) for p, n in zip(prompts, lengths, strict=True)]
        got = [list(r) for r in requests]
    expected = [naive_greedy(trained, p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert got == expected
    assert model.eager_steps == []  # every decode pass replayed a graph
    buckets = set(model.fast_decode._graphs)
    assert Counting.recorded == len(buckets)  # each (rows, slots) recorded once, then replayed
    assert {rows for rows, _ in buckets} >= {4, 2, 1} and {slots for _, slots in buckets} >= {8, 16, 24}
    assert Counting.replays >= max(lengths) - 1


def test_a_padded_step_writes_only_its_rows_and_matches_the_eager_step(trained):
    """3 rows of different lengths run in the 4-row bucket: the 4th row (another request's, say one being
    prefilled) keeps every key and value it had; the 3 rows get the new keys and values and the logits that
    the eager lean step gives on a copy of the same cache (the same weights and positions; the graph's step
    drops the norms' eps, 1e-5 of a mean square of ~1e-3 here, so within 2%)."""
    model = _graphed(trained)
    decoder = model.fast_decode
    torch.manual_seed(1)
    cache = SlotCache(model.config, 6, 32)
    cache.k.normal_()
    cache.v.normal_()
    for row, length in enumerate([7, 3, 12, 9]):
        cache.set_length(row, length)
    reference = SlotCache(model.config, 6, 32)
    reference.k.copy_(cache.k)
    reference.v.copy_(cache.v)
    reference.lengths, reference.lengths_t = list(cache.lengths), cache.lengths_t.clone()
    ids = torch.tensor([[5], [17], [42]])
    with torch.inference_mode():
        got = decoder(ids, cache.view(0, 3))
        want = decoder.eager.inner(ids, reference.view(0, 3))
    assert model.eager_steps == [] and set(decoder._graphs) == {(4, min(32, cuda_graphs.SLOT_STEP))}
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(cache.k, reference.k, rtol=2e-2, atol=2e-2)  # the 3 rows' new slots, and nothing else
    torch.testing.assert_close(cache.v, reference.v, rtol=2e-2, atol=2e-2)
    assert torch.equal(cache.k[:, 3:], reference.k[:, 3:]) and torch.equal(cache.v[:, 3:], reference.v[:, 3:])
    assert cache.lengths[:4] == [8, 4, 13, 9]


def test_the_static_loop_records_again_for_a_new_cache(trained):
    """`decode_n` makes a new cache per call: the old graphs read freed memory, so they are dropped."""
    model = _graphed(trained)
    prompt = PATTERN[:6]
    with torch.inference_mode():
        first = [row[0] for row in decode_n(model, [prompt], _greedy_settings(10))]
        after_first = Counting.recorded
        second = [row[0] for row in decode_n(model, [prompt], _greedy_settings(10))]
    assert first == second == naive_greedy(trained, prompt, 10)
    assert model.eager_steps == [] and after_first >= 1 and Counting.recorded == 2 * after_first
    assert len(model.fast_decode._graphs) == after_first  # only the live cache's graphs are kept


def test_which_steps_take_a_graph(trained):
    decoder = _graphed(trained).fast_decode
    ids = lambda rows: torch.zeros(rows, 1, dtype=torch.long)  # noqa: E731
    slots = SlotCache(decoder.model.config, 70, 16)
    assert decoder._takes(ids(1), decoder.model.new_cache(1, 8))
    assert decoder._takes(ids(64), slots.view(0, 64))
    assert not decoder._takes(ids(65), slots.view(0, 65))  # more than MAX_ROWS: eager
    assert not decoder._takes(ids(2), slots.view(1, 3))  # not from row 0
    assert not decoder._takes(ids(2), decoder.model.new_cache(2, 8, pad=torch.tensor([0, 1])))


def test_a_failed_recording_warns_once_and_decodes_eagerly(trained):
    def broken(fn, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    model = _graphed(trained, recorder=broken)
    prompt = PATTERN[3:9]
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        got = [row[0] for row in decode_n(model, [prompt], _greedy_settings(8))]
    assert got == naive_greedy(trained, prompt, 8)
    assert len(model.eager_steps) == 7  # the 7 steps after the prompt's first token
    said = [str(w.message) for w in caught if "CUDA graph" in str(w.message)]
    assert len(said) == 1 and "stream is capturing" in said[0] and "eager step" in said[0]
    assert model.fast_decode.failed is not None


def test_compile_on_a_cpu_keeps_the_ahead_of_time_graph(trained):
    """`compile=True` means CUDA graphs on a CUDA device only (the GPU test below checks that side)."""
    from cogni_mamba.inference.compiled_step import CompiledDecoder

    model = prepare_model(_copy(trained), torch.float32, compile=True)
    assert isinstance(model.fast_decode, CompiledDecoder) and not isinstance(model.fast_decode, GraphedDecoder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_graphs_on_a_gpu_give_the_uncaptured_steps_tokens(trained):
    """Recorded CUDA graphs against the same step called directly, bf16 on the GPU, 3 engine rows."""
    def run(recorder):
        model = prepare_model(_copy(trained).cuda(), torch.bfloat16, compile=True)
        assert isinstance(model.fast_decode, GraphedDecoder)
        if recorder is not None:
            model.fast_decode = GraphedDecoder(model.fast_decode.eager, recorder=recorder)
        engine = Engine(model, max_batch=4)
        with torch.inference_mode():
            requests = [engine.submit(p, _greedy_settings(12)) for p in (PATTERN[:5], PATTERN[2:4], PATTERN[4:12])]
            return [list(r) for r in requests], model.fast_decode

    graphed, decoder = run(None)
    assert decoder.failed is None and decoder.recorded >= 1
    assert graphed == run(CallAgain)[0]


def test_the_gpu_checks_graph_step_runs_here_with_the_stand_in(capsys):
    """`scripts/cuda_checks.py graphs` (gpu_check's "graphs" step) on the CPU: CallAgain in place of the graphs,
    so it must agree with the uncaptured step exactly and pass."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "cuda_checks.py"
    spec = importlib.util.spec_from_file_location("cuda_checks", path)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    assert checks.main(["graphs", "--device", "cpu", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| nano |")]
    assert [row.split("|")[2].strip() for row in rows] == ["1", "4"]
    assert all(row.split("|")[6].strip() == "1.000" for row in rows) and out.rstrip().endswith("PASS")
