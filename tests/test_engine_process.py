"""The engine in a child process (`inference.EngineProcess`, what `cogni-mamba serve` runs): the same tokens as
the naive reference and the in-process engine, cancellation, the 429 decided in the parent, and clear
sentences when the child cannot load the model or dies."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import pytest
import torch

from cogni_mamba.config import GenerationConfig
from cogni_mamba.errors import CogniError
from cogni_mamba.inference import Engine, EngineBusy, EngineProcess, greedy_settings
from tests.references import naive_greedy
from tests.test_serve_fixtures import make_tiny_checkpoint, wait_for

CONTEXT = 256


def start_process(tiny, **kwargs) -> EngineProcess:
    kwargs.setdefault("max_batch", 4)
    kwargs.setdefault("max_queue", 8)
    kwargs.setdefault("threads", 1)
    return EngineProcess(tiny.path, "cpu", "fp32", max_len=CONTEXT,
                         bos_id=tiny.specials["<|endoftext|>"], **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("engine_process") / "run", context=CONTEXT)


@pytest.fixture(scope="module")
def engine(tiny):
    process = start_process(tiny)
    yield process
    process.stop()
    assert not process._process.is_alive()


def test_the_thread_count_is_reported_before_the_first_request(tiny):
    process = start_process(tiny, threads="auto")
    try:
        assert wait_for(lambda: process.stats().threads is not None, 30)  # measured by the engine's thread at start
    finally:
        process.stop()


def test_concurrent_greedy_requests_equal_the_naive_reference(tiny, engine):
    torch.set_num_threads(1)
    prompts = [[1 + (7 * i + j) % 250 for j in range(3 + 5 * i)] for i in range(6)]  # 6 requests, 4 slots
    lengths = [5, 40, 12, 33, 1, 20]
    requests = [engine.submit(p, greedy_settings(n)) for p, n in zip(prompts, lengths, strict=True)]
    got = [list(r) for r in requests]  # iterating blocks until each has finished
    for prompt, n, tokens, request in zip(prompts, lengths, got, requests, strict=True):
        assert tokens == naive_greedy(tiny.model, prompt, n)
        assert request.finish_reason == "length" and request.completion_tokens == n
    assert wait_for(lambda: engine.stats().active == 0, 5)
    stats = engine.stats()
    assert stats.generated_tokens >= sum(lengths) and stats.threads == 1


def test_a_seed_of_any_size_and_a_failed_submission_leave_the_process_serving(tiny, engine):
    """A hostile client once killed the engine process with seed 10**23 (torch's manual_seed overflowed in the
    child's command loop): seeds are taken modulo 2**64 now, and any submission the engine raises on fails that
    request alone, with a sentence."""
    settings = GenerationConfig(temperature=0.9, top_k=40, seed=10**23, max_new_tokens=6)
    huge = list(engine.submit([5, 6, 7], settings))
    same = list(engine.submit([5, 6, 7], dataclasses.replace(settings, seed=10**23 % 2**64)))
    assert len(huge) == 6 and huge == same

    from cogni_mamba.inference.remote import _ChildLink

    class Refusing:
        def submit_samples(self, *args, **kwargs):
            raise ValueError("Overflow when unpacking long long")

        def stats(self):
            return engine.stats()

    sent = []
    link = _ChildLink(Refusing(), type("Events", (), {"send": staticmethod(sent.append)})())
    link.submit(40, [1, 2], settings, 2, ())
    (kind, updates, _), = sent
    assert kind == "update" and [u[:3] for u in updates] == [(40, [], "error"), (41, [], "error")]
    assert updates[0][3] == "the engine could not take it (ValueError: Overflow when unpacking long long)"
    assert list(engine.submit([5, 6, 7], greedy_settings(3))) == naive_greedy(tiny.model, [5, 6, 7], 3)
    assert engine.running


def test_a_seeded_sampled_request_matches_the_in_process_engine(tiny, engine):
    settings = GenerationConfig(temperature=0.9, top_k=40, top_p=0.95, seed=123, max_new_tokens=24)
    prompt = [5, 6, 7, 8]
    local = Engine(tiny.model, max_batch=2, bos_id=tiny.specials["<|endoftext|>"])
    expected = list(local.submit(prompt, settings))
    busy = [engine.submit([9, 9, 9], greedy_settings(60)) for _ in range(2)]  # batch mates
    assert list(engine.submit(prompt, settings)) == expected
    for request in busy:
        request.cancel()


def test_n_samples_share_one_prefill_and_use_seed_plus_index(tiny, engine):
    settings = GenerationConfig(temperature=1.0, top_k=None, top_p=None, seed=7, max_new_tokens=10)
    local = Engine(tiny.model, max_batch=4, bos_id=tiny.specials["<|endoftext|>"])
    expected = [list(r) for r in local.submit_samples([3, 4, 5], settings, 3)]
    before = engine.stats().prefill_tokens
    got = [list(r) for r in engine.submit_samples([3, 4, 5], settings, 3)]
    assert got == expected
    assert wait_for(lambda: engine.stats().prefill_tokens == before + 3, 5)  # the 3-token prompt ran once


def test_cancel_ends_the_stream_and_frees_the_slot(engine):
    request = engine.submit([1, 2, 3], greedy_settings(CONTEXT - 10))
    assert next(request) is not None
    woken = threading.Event()
    request.on_update(woken.set)
    request.cancel()
    assert request.finish_reason == "cancelled" and woken.is_set()
    assert list(request) == []  # nothing more is handed out
    assert wait_for(lambda: engine.stats().active == 0 and not engine._live, 5)
    assert engine.stats().generated_tokens < 10_000
    assert list(engine.submit([4], greedy_settings(3))) != []  # the engine goes on


def test_int8_weights_in_the_child_give_the_in_process_int8_tokens(tiny):
    """`serve --int8 --engine process`: the child quantizes the checkpoint it loads like the parent would."""
    from cogni_mamba.inference import load_model_for_inference

    model, _, _ = load_model_for_inference(tiny.path, "cpu", "fp32", quantize="int8")
    local = Engine(model, max_batch=2, bos_id=tiny.specials["<|endoftext|>"])
    process = start_process(tiny, quantize="int8")
    try:
        assert process.info["dtype"] == "int8"
        for prompt in ([5, 6, 7, 8], [40, 41]):
            assert list(process.submit(prompt, greedy_settings(20))) == list(local.submit(prompt, greedy_settings(20)))
    finally:
        process.stop()


def test_a_full_queue_is_refused_at_once(tiny):
    process = start_process(tiny, max_batch=1, max_queue=1)
    try:
        first = process.submit([1, 2], greedy_settings(CONTEXT - 10))
        second = process.submit([1, 2], greedy_settings(3))
        start = time.perf_counter()
        with pytest.raises(EngineBusy, match="busy"):
            process.submit([1, 2], greedy_settings(3))
        assert time.perf_counter() - start < 0.1  # no round trip to the child
        first.cancel()
        assert len(list(second)) == 3
        assert len(list(process.submit([1], greedy_settings(2)))) == 2  # room again
    finally:
        process.stop()


def test_a_damaged_checkpoint_is_one_sentence_from_the_child(tiny, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny.path, broken)
    weights = next(broken.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CogniError) as info:
        EngineProcess(next(p.parent for p in broken.rglob("config.json")), "cpu", "fp32", max_len=CONTEXT, bos_id=None)
    message = str(info.value)
    assert "Traceback" not in message and "\n" not in message
    assert "broken" in message


def test_a_dead_child_ends_its_requests_with_an_error_and_refuses_new_ones(tiny):
    process = start_process(tiny)
    try:
        request = process.submit([1, 2, 3], greedy_settings(CONTEXT - 10))
        assert next(request) is not None
        os.kill(process._process.pid, signal.SIGKILL)
        with pytest.raises(CogniError, match="engine process stopped"):
            list(request)
        assert request.finish_reason == "error"
        with pytest.raises(CogniError, match="restart"):
            process.submit([1], greedy_settings(2))
    finally:
        process.stop()


def test_compile_reaches_the_model_in_the_child_and_in_process(tiny, monkeypatch):
    """`serve --compile`: both engines get a CompiledDecoder, built before serving (`ready`, stubbed here: the
    compiled step itself is tested in test_inference_compiled.py)."""
    from cogni_mamba.inference.compiled_step import CompiledDecoder
    from cogni_mamba.inference.remote import EngineSpec, _build_engine
    from cogni_mamba.serve.service import Service

    readied = []
    monkeypatch.setattr(CompiledDecoder, "ready", lambda self, announce=None: readied.append(self))
    engine = _build_engine(EngineSpec(str(tiny.path), "cpu", "fp32", 2, 4, 1, "int8", True))
    assert isinstance(engine.model.fast_decode, CompiledDecoder) and readied == [engine.model.fast_decode]
    service = Service.from_checkpoint(tiny.path, "cpu", dtype="fp32", compile=True, max_batch=2)
    assert isinstance(service.model.fast_decode, CompiledDecoder)  # the CLI builds it (compiled_step.build_now)
