"""Our AVX512-VNNI int8 product (inference/int8_kernel.py) against the same arithmetic written in plain torch."""

import warnings

import pytest
import torch

from cogni_mamba.inference import int8_kernel, precision


@pytest.fixture
def built():
    if not int8_kernel.wanted():
        pytest.skip("COGNI_MAMBA_INT8=fbgemm is set")
    reason = int8_kernel.why_unavailable()
    if reason is not None:
        pytest.skip(f"the int8 kernel is not available here: {reason}")


def quantized_rows(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 50 + 1e-3


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Each row of x quantized on its own to 8 unsigned bits over [min(x, 0), max(x, 0)] (fp32 arithmetic, as the
    kernel does it): s = range / 255, z = round(-min / s), u = clamp(round(x / s) + z, 0, 255); then
    ((u - z) @ W.T) * s * scale, in fp64."""
    lo = x.amin(dim=1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=1, keepdim=True).clamp(min=0)
    s = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    z = torch.round(-lo / s).clamp(0, 255)
    u = (torch.round(x * (1 / s)) + z).clamp(0, 255)
    return ((u - z).double() @ weight.double().T) * s.double() * scale.double()


@pytest.mark.parametrize("n,k,rows", [(16, 64, 1), (2304, 768, 1), (50, 768, 3), (33, 20, 2), (100, 130, 9),
                                      (40, 48, 8), (17, 4, 5), (4096, 256, 28)])
def test_kernel_matches_the_integer_arithmetic(n, k, rows, built):
    weight, scale = quantized_rows(n, k, seed=n + k)
    x = torch.randn(rows, k) * 3
    x[0, 0] = 0.0
    got = int8_kernel.linear(x, *int8_kernel.pack(weight, scale), n)
    want = reference(x, weight, scale)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    # the integer dot products are exact; only the final fp32 products round
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


def test_zero_rows_and_all_zero_inputs(built):
    weight, scale = quantized_rows(20, 32, seed=1)
    packed = int8_kernel.pack(weight, scale)
    assert int8_kernel.linear(torch.empty(0, 32), *packed, 20).shape == (0, 20)
    assert int8_kernel.linear(torch.zeros(2, 32), *packed, 20).eq(0).all()


def test_a_row_gives_the_same_bits_alone_in_any_batch_and_on_any_thread_count(built):
    weight, scale = quantized_rows(300, 256, seed=2)
    packed = int8_kernel.pack(weight, scale)
    x = torch.randn(11, 256)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            alone = torch.cat([int8_kernel.linear(x[i:i + 1], *packed, 300) for i in range(11)])
            outs += [alone, int8_kernel.linear(x, *packed, 300), int8_kernel.linear(x[3:8], *packed, 300)]
    finally:
        torch.set_num_threads(before)
    alone = outs[0]
    for out in outs:
        assert torch.equal(out, alone if out.shape[0] == 11 else alone[3:8])


def test_pack_lays_out_sixteen_rows_by_four_inputs_with_zero_padding():
    weight, scale = quantized_rows(18, 6, seed=3)
    packed, row_sums, scales = int8_kernel.pack(weight, scale)
    assert packed.shape == (2, 2, 16, 4)
    assert packed[0, 1, 5, 1] == weight[5, 5]  # block 0, inputs 4..7, row 5, input 5
    assert packed[1, 0, 1, 3] == weight[17, 3] and packed[1, 0, 2].eq(0).all() and packed[0, 1, :, 2:].eq(0).all()
    assert torch.equal(row_sums[:18], weight.sum(dim=1, dtype=torch.int32)) and row_sums[18:].eq(0).all()
    assert torch.equal(scales[:18], scale) and scales[18:].eq(0).all()


def test_bad_inputs_are_refused_with_a_message(built):
    weight, scale = quantized_rows(20, 32, seed=4)
    packed = int8_kernel.pack(weight, scale)
    with pytest.raises(RuntimeError, match="fp32"):
        int8_kernel.linear(torch.randn(2, 32, dtype=torch.bfloat16), *packed, 20)
    with pytest.raises(RuntimeError, match="shapes"):
        int8_kernel.linear(torch.randn(2, 40), *packed, 20)


def test_a_failed_build_falls_back_to_fbgemm_with_one_warning(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions\n(more lines)")

    monkeypatch.setattr(int8_kernel, "cpu_supports", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.delenv("COGNI_MAMBA_INT8", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/tmp/elsewhere")  # the folder the sentence names
    int8_kernel.why_unavailable.cache_clear()
    int8_kernel._warn_once.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"^int8 runs fbgemm's product, not ours: building it failed \(Ninja is "
                                             r"required to load C\+\+ extensions\); it needs a C\+\+ compiler, .* under /tmp/elsewhere\.$"):
            layer = precision.Int8Linear(torch.nn.Linear(32, 8, bias=False))
        assert layer.vnni is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once is enough
            precision.Int8Linear(torch.nn.Linear(32, 8, bias=False))
        if precision.fbgemm_available():
            assert layer.packed is not None
            x = torch.randn(3, 32)
            torch.testing.assert_close(layer(x), x @ layer.dequantized().T, rtol=0.05, atol=0.05)
    finally:
        int8_kernel.why_unavailable.cache_clear()  # the next caller builds (or loads) it again
        int8_kernel._warn_once.cache_clear()


def test_cogni_mamba_int8_fbgemm_turns_it_off(monkeypatch):
    monkeypatch.setenv("COGNI_MAMBA_INT8", "fbgemm")
    assert not int8_kernel.available()
    assert precision.Int8Linear(torch.nn.Linear(32, 8, bias=False)).vnni is None


def test_with_it_an_int8_engine_row_does_not_depend_on_its_batch(built):
    """Rows quantized on their own: a seeded request (and a greedy one) gives the same tokens alone and beside
    other requests of other lengths. (fbgemm's one scale per call did not: its rows followed their batch.)"""
    import copy

    from cogni_mamba import CogniMamba, ModelConfig
    from cogni_mamba.config import GenerationConfig
    from cogni_mamba.inference import Engine, greedy_settings

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=128, max_seq_len=256,
                      init_std=0.3)
    model = precision.prepare_model(copy.deepcopy(CogniMamba(cfg)), torch.bfloat16, quantize="int8")
    assert model.output.vnni is not None
    sampled = GenerationConfig(temperature=0.9, top_k=40, top_p=0.95, seed=123, max_new_tokens=40)
    prompt = [5, 6, 7, 8, 9, 10]
    alone = {name: list(Engine(model, max_batch=4).submit(prompt, settings))
             for name, settings in (("sampled", sampled), ("greedy", greedy_settings(40)))}
    for name, settings in (("sampled", sampled), ("greedy", greedy_settings(40))):
        engine = Engine(model, max_batch=4).start()
        try:
            mates = [engine.submit([9 + j] * (3 + 7 * j), greedy_settings(80)) for j in range(3)]
            assert list(engine.submit(prompt, settings)) == alone[name], name
            for mate in mates:
                mate.cancel()
        finally:
            engine.stop()


@pytest.mark.parametrize("text, said", [
    ("Error building extension 'cogni_mamba_int8': [1/2] c++ -MMD -c int8_linear.cpp -o int8_linear.o\n"
     "FAILED: int8_linear.o\nc++ -MMD -c int8_linear.cpp -o int8_linear.o\n/tmp/cc1.s: Assembler messages:\n"
     "/tmp/cc1.s: Fatal error: int8_linear.o: No space left on device\nninja: build stopped: subcommand failed.",
     "int8_linear.o: No space left on device"),
    ("Error building extension 'cogni_mamba_int8': [1/2] /opt/cc -c x.cpp\nFAILED: x.o\n/opt/cc -c x.cpp\n"
     "/bin/sh: 1: /opt/cc: not found\nninja: build stopped: subcommand failed.", "/bin/sh: 1: /opt/cc: not found"),
    ("Ninja is required to load C++ extensions (pip install ninja to get it)",
     "Ninja is required to load C++ extensions (pip install ninja to get it)"),
    ("CppCompileError: C++ compile error\nCommand:\ng++ /tmp/t/header.hpp -O1 -o /tmp/t/header.hpp.gch\nOutput:\n"
     "<built-in>: fatal error: when writing output to /tmp/t/header.i: No space left on device\ncompilation terminated.",
     "when writing output to /tmp/t/header.i: No space left on device"),
    ("CppCompileError: C++ compile error\nCommand:\ng++ /tmp/t/x.cpp\nOutput:\n", "the compiler gave no reason"),
])
def test_a_build_failure_is_told_by_its_telling_line(text, said):
    """Texts as torch.utils.cpp_extension (a full disk, no compiler, no ninja) and inductor (the compiled step on a
    full disk) raise them, shortened."""
    from cogni_mamba.errors import build_failure

    assert build_failure(RuntimeError(text)) == said


def test_one_signed_rows_use_all_256_codes_of_their_range(built):
    """Rows of one sign (after SiLU-like ops) put 0 at code 0 or 255: the whole range serves the values."""
    weight, scale = quantized_rows(64, 96, seed=5)
    x = torch.randn(4, 96).abs() * 2
    x[1] = -x[1]
    x[2, :] = 0.5  # a constant row
    got = int8_kernel.linear(x, *int8_kernel.pack(weight, scale), 64)
    torch.testing.assert_close(got.double(), reference(x, weight, scale), rtol=2e-6, atol=1e-6)
    exact = x @ (weight.float() * scale[:, None]).T  # the float product: within 8-bit rounding of the range
    assert ((got - exact).norm(dim=1) / exact.norm(dim=1)).max() < 0.01


def test_a_cpu_without_vnni_falls_back_quietly(monkeypatch):
    monkeypatch.setattr(int8_kernel, "cpu_supports", lambda: False)
    monkeypatch.delenv("COGNI_MAMBA_INT8", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/tmp/elsewhere")  # the folder the sentence names
    int8_kernel.why_unavailable.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing the user could act on: no warning
            assert not int8_kernel.available()
        assert int8_kernel.why_unavailable() == "this CPU has no AVX512-VNNI"
    finally:
        int8_kernel.why_unavailable.cache_clear()
