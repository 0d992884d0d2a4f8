"""The compiled decode step (`inference.compiled_step`) against independent references: the fp32 model's full
forward (logits within a tolerance, greedy tokens of one row and of several rows of different lengths by full
recomputation), and its fallbacks to the eager lean step (more than 16 rows, too many slots to attend to, no C++
compiler, a failed compile, a nearly full disk)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from cogni_mamba import CogniMamba, ModelConfig
from cogni_mamba.config import GenerationConfig
from cogni_mamba.generate import decode_n
from cogni_mamba.inference import Engine, bf16_kernel, compiled_step, int8_kernel
from cogni_mamba.inference.compiled_step import CompiledDecoder
from cogni_mamba.inference.precision import prepare_model

from .references import naive_greedy

SMALL = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=96, max_seq_len=64)
PATTERN = [5, 17, 42, 8, 63, 29, 71, 3, 88, 50, 12, 36]  # the sequence the trained-like model learns to continue


def _trained() -> CogniMamba:
    """A 2-layer model fitted for a few seconds to continue PATTERN (confident, like a trained one)."""
    torch.manual_seed(0)
    model = CogniMamba(ModelConfig(**SMALL))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq = torch.tensor(PATTERN * 5)
    for _ in range(150):
        start = int(torch.randint(0, len(PATTERN), ()))
        ids = seq[start:start + 33][None]
        _, loss = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _copy(model: CogniMamba) -> CogniMamba:
    clone = CogniMamba(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.eval()


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    settings = GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=n)
    return [row[0] for row in decode_n(model, [prompt], settings)]


@pytest.fixture(scope="module")
def trained() -> CogniMamba:
    return _trained()


@pytest.fixture(autouse=True)
def _package_cache(tmp_path_factory, monkeypatch):
    """Compiled packages go to one folder per test session, not ~/.cache."""
    monkeypatch.setenv("COGNI_MAMBA_CACHE", str(tmp_path_factory.getbasetemp() / "cogni-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype, quantize, rel_tol, product", [(torch.float32, None, 1e-3, None),
                                                               (torch.bfloat16, None, 0.05, "ours"),
                                                               (torch.bfloat16, None, 0.05, "onednn"),
                                                               (torch.bfloat16, "int8", 0.1, "ours"),
                                                               (torch.bfloat16, "int8", 0.1, "fbgemm")])
def test_compiled_step_follows_the_fp32_forward(trained, dtype, quantize, rel_tol, product, monkeypatch):
    """bf16: the graph calls our bf16 kernel ("ours", where the CPU has AVX512-BF16) or oneDNN's product
    (COGNI_MAMBA_BF16=onednn). int8: our int8 kernel ("ours", where the CPU has AVX512-VNNI) or, on fbgemm
    machines (COGNI_MAMBA_INT8=fbgemm here), the weight-only product on bf16 activations."""
    if compiled_step.compile_unavailable(torch.device("cpu")):
        pytest.skip(compiled_step.compile_unavailable(torch.device("cpu")))
    kernel = int8_kernel if quantize == "int8" else bf16_kernel
    if product == "ours" and not kernel.available():
        pytest.skip(f"our {dtype if quantize is None else quantize} kernel does not run here: {kernel.why_unavailable()}")
    monkeypatch.setenv("COGNI_MAMBA_INT8", "fbgemm" if product == "fbgemm" else "")
    monkeypatch.setenv("COGNI_MAMBA_BF16", "onednn" if product == "onednn" else "")
    model = prepare_model(_copy(trained), dtype, quantize=quantize, compile=True)
    assert isinstance(model.fast_decode, CompiledDecoder)
    assert model.fast_decode.step.vnni == (quantize == "int8" and product == "ours")
    assert model.fast_decode.step.ours == (quantize is None and product == "ours")
    prompt = PATTERN[3:8]
    ids = torch.tensor([prompt + PATTERN[8:12] + PATTERN[:4]])  # 13 tokens: 5 prefilled, 8 decoded one by one
    with torch.inference_mode():
        reference = trained(ids)[0, 4:]  # (9, V): the fp32 forward's logits for every decoded position
        cache = model.new_cache(1, 32)
        got = [model(ids[:, :5], cache=cache, last_only=True)[0, -1]]
        got += [model(ids[:, t:t + 1], cache=cache)[0, -1] for t in range(5, 13)]
    assert model.fast_decode.failed is None and model.fast_decode.loaded is False
    got = torch.stack(got).float()
    err = (got - reference).norm() / reference.norm()
    assert err < rel_tol, f"relative logit error {err:.5f}"
    with torch.inference_mode():
        expected = naive_greedy(trained, prompt, 20)
    assert _greedy(model, prompt, 20) == expected  # greedy by full fp32 recomputation (another cache shape)
    assert len(set(expected)) > 5  # the trained-like model continues the pattern, not one token
    prompts = [PATTERN[:5], PATTERN[2:4], PATTERN[4:12]]  # rows of different lengths in one graph call
    engine = Engine(model, max_batch=4)
    with torch.inference_mode():
        requests = [engine.submit(p, GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=12))
                    for p in prompts]
        assert [list(r) for r in requests] == [naive_greedy(trained, p, 12) for p in prompts]
        same_length = [PATTERN[:4], PATTERN[5:9]]  # the static loop's batch: a KVCache with no padding, 2 rows
        per_row = [naive_greedy(trained, p, 10) for p in same_length]
    steps = list(decode_n(model, same_length, GenerationConfig(temperature=0.0, top_k=None, top_p=None,
                                                                max_new_tokens=10)))
    assert [[step[b] for step in steps] for b in range(2)] == per_row
    assert model.fast_decode.failed is None
    again = prepare_model(_copy(trained), dtype, quantize=quantize, compile=True)  # a later start: loads the package
    assert _greedy(again, prompt, 20) == expected and again.fast_decode.loaded is True
    assert again.fast_decode.compile_seconds < 5


def test_package_key_follows_the_weights(trained):
    a = prepare_model(_copy(trained), torch.float32, compile=True).fast_decode.step
    b = prepare_model(_copy(trained), torch.float32, compile=True).fast_decode.step
    assert compiled_step.package_key(a) == compiled_step.package_key(b)
    b.embedding[0, 0] += 1
    assert compiled_step.package_key(a) != compiled_step.package_key(b)


def test_the_engine_decodes_rows_of_different_lengths_through_it(trained):
    """The engine's decoding block (3 rows, then fewer as they finish) goes through the step's graph (run uncompiled
    here: the same StaticStep); each row's greedy tokens equal full fp32 recomputation of its own prompt."""
    model = prepare_model(_copy(trained), torch.float32, compile=True)
    batches = []
    model.fast_decode.runner = lambda ids, *rest: batches.append(ids.shape[0]) or model.fast_decode.step(ids, *rest)
    engine = Engine(model, max_batch=4)
    prompts, lengths = [PATTERN[:5], PATTERN[2:4], PATTERN[4:12]], [8, 12, 5]
    with torch.inference_mode():
        requests = [engine.submit(p, GenerationConfig(temperature=0.0, top_k=None, top_p=None, max_new_tokens=n))
                    for p, n in zip(prompts, lengths, strict=True)]
        got = [list(r) for r in requests]
        expected = [naive_greedy(trained, p, n) for p, n in zip(prompts, lengths, strict=True)]
    assert got == expected
    assert max(batches) == 3 and min(batches) == 1 and sum(batches) == sum(n - 1 for n in lengths)


def test_which_steps_take_the_graph(trained, monkeypatch):
    decoder = prepare_model(_copy(trained), torch.float32, compile=True).fast_decode
    if decoder.failed:
        pytest.skip(decoder.failed)
    from cogni_mamba.inference.cache import SlotCache

    def ids(rows: int) -> torch.Tensor:
        return torch.zeros(rows, 1, dtype=torch.long)

    slots = SlotCache(decoder.model.config, 20, 16)
    assert decoder._takes(ids(1), decoder.model.new_cache(1, 8))
    assert decoder._takes(ids(2), decoder.model.new_cache(2, 8))
    assert decoder._takes(ids(3), slots.view(0, 3))
    assert decoder._takes(ids(16), slots.view(0, 16))
    assert not decoder._takes(ids(17), slots.view(0, 17))  # more than MAX_ROWS: eager
    assert not decoder._takes(ids(2), slots.view(1, 3))  # not from row 0
    padded = decoder.model.new_cache(2, 8, pad=torch.tensor([0, 1]))
    assert not decoder._takes(ids(2), padded)
    for row, length in enumerate([10, 3, 7]):
        slots.set_length(row, length)
    monkeypatch.setattr(compiled_step, "MAX_ATTENDED", 30)  # 3 rows x the longest's 10 slots: just in
    assert decoder._takes(ids(3), slots.view(0, 3))
    slots.set_length(1, 11)
    assert not decoder._takes(ids(3), slots.view(0, 3))  # 33 slots to attend to: eager


def test_without_a_compiler_it_decodes_eagerly_with_one_sentence(trained, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.warns(UserWarning, match=r"^Not compiling: no C\+\+ compiler .*; decoding runs the eager step\.$"):
        model = prepare_model(_copy(trained), torch.float32, compile=True)
    reason = model.fast_decode.failed
    assert reason is not None and "C++ compiler" in reason and "\n" not in reason
    eager = prepare_model(_copy(trained), torch.float32)
    assert _greedy(model, PATTERN[:4], 8) == _greedy(eager, PATTERN[:4], 8)
    assert compiled_step.compile_unavailable(torch.device("meta")).endswith("not meta")


def test_a_failed_compile_warns_once_and_decodes_eagerly(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("COGNI_MAMBA_CACHE", str(tmp_path))  # no package from another test to load

    def broken(*args, package_path, **kwargs):
        Path(package_path).write_bytes(b"half a package")  # as a writer that fails half-way leaves it
        raise RuntimeError("no luck\nmore lines of a traceback")

    import torch._inductor

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    model = prepare_model(_copy(trained), torch.float32, compile=True)
    if model.fast_decode.failed:
        pytest.skip(model.fast_decode.failed)
    eager = prepare_model(_copy(trained), torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = _greedy(model, PATTERN[:4], 8)
    assert tokens == _greedy(eager, PATTERN[:4], 8)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "no luck" in messages[0] and "\n" not in messages[0], messages
    assert messages[0].endswith("decoding runs the eager step.")
    assert list((tmp_path / "compiled").iterdir()) == []  # the half-written package is gone


def test_a_nearly_full_disk_is_refused_before_compiling(trained, monkeypatch, tmp_path):
    """Too little free space for the package (its weights twice and 32 MiB): one sentence that says so, eager
    decoding, nothing written, and no compile started (on a full disk torch's package writer can abort)."""
    import collections

    import torch._inductor

    monkeypatch.setenv("COGNI_MAMBA_CACHE", str(tmp_path))
    started = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: started.append(1))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(compiled_step.shutil, "disk_usage", lambda path: usage(2**30, 2**30 - 5 * 2**20, 5 * 2**20))
    model = prepare_model(_copy(trained), torch.float32, compile=True)
    if model.fast_decode.failed:
        pytest.skip(model.fast_decode.failed)
    need = compiled_step.package_bytes(model.fast_decode.step)
    assert need == 2 * sum(b.numel() * b.element_size() for b in model.fast_decode.step.buffers()) + 32 * 2**20
    eager = prepare_model(_copy(trained), torch.float32)
    with pytest.warns(UserWarning) as caught:
        tokens = _greedy(model, PATTERN[:4], 8)
    assert tokens == _greedy(eager, PATTERN[:4], 8) and not started
    message = str(caught[0].message)
    assert f"only 5 MB are free in {tmp_path / 'compiled'}" in message and "COGNI_MAMBA_CACHE" in message
    assert f"needs about {need / 2**20:,.0f} MB" in message and "\n" not in message
    assert list((tmp_path / "compiled").iterdir()) == []


def test_ready_builds_before_the_first_step_and_announces_only_a_build(trained, monkeypatch, tmp_path):
    monkeypatch.setenv("COGNI_MAMBA_CACHE", str(tmp_path))  # empty: whatever the other tests built

    def fresh():
        decoder = prepare_model(_copy(trained), torch.float32, compile=True).fast_decode
        if decoder.failed:
            pytest.skip(decoder.failed)
        built = []
        monkeypatch.setattr(decoder, "_package", lambda cache: built.append(cache.k.shape) or "runner")
        return decoder, built

    decoder, built = fresh()
    said = []
    decoder.ready(announce=said.append)
    assert decoder.runner == "runner" and len(built) == 1 and decoder.compile_seconds is not None
    assert len(said) == 1 and said[0].startswith("Compiling the decode step")
    decoder.ready(announce=said.append)  # already there: nothing again
    assert len(built) == 1 and len(said) == 1
    again, _ = fresh()
    again._path().parent.mkdir(parents=True, exist_ok=True)
    again._path().write_bytes(b"")  # a package on disk: loading it is quick, so nothing is said
    again.ready(announce=said.append)
    assert len(said) == 1 and again.runner == "runner"
    broken, _ = fresh()
    monkeypatch.setattr(broken, "_package", lambda cache: (_ for _ in ()).throw(RuntimeError("no linker")))
    with pytest.warns(UserWarning, match="compiling the decode step failed \\(no linker\\)"):
        broken.ready()
    assert broken.runner is None and "no linker" in broken.failed
