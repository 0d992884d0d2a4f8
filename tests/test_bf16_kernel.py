"""Our AVX512-BF16 product (inference/bf16_kernel.py) against the exact product of the same bf16 numbers, and the
layer that chooses between it and oneDNN's (precision.PackedLinear)."""

import pytest
import torch

from cogni_mamba.inference import bf16_kernel, precision


@pytest.fixture
def built():
    if not bf16_kernel.wanted():
        pytest.skip("COGNI_MAMBA_BF16=onednn is set")
    reason = bf16_kernel.why_unavailable()
    if reason is not None:
        pytest.skip(f"the bf16 kernel is not available here: {reason}")


def bf16_pair(n: int, k: int, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()


@pytest.mark.parametrize("n,k,rows", [(16, 64, 1), (2304, 768, 1), (50, 768, 3), (33, 2, 2), (100, 254, 9),
                                      (40, 48, 8), (17, 4, 16), (1536, 256, 28)])
def test_kernel_is_the_exact_product_rounded_once_to_bf16(n, k, rows, built):
    """fp32 sums of bf16 products, rounded to bf16 at the end: within one bf16 rounding (plus fp32 summation error)
    of the exact fp64 product of the same numbers; every row the same alone as in its batch, bit for bit."""
    x, weight = bf16_pair(n, k, rows, seed=n + k + rows)
    got = bf16_kernel.linear(x, bf16_kernel.pack(weight), n)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    exact = x.double() @ weight.double().T
    bound = exact.abs() * 2**-8 + 1e-6 * k * exact.abs().max()  # half a bf16 step, and fp32's sums
    assert ((got.double() - exact).abs() <= bound).all()
    for i in range(rows):
        assert torch.equal(bf16_kernel.linear(x[i:i + 1], bf16_kernel.pack(weight), n), got[i:i + 1])


def test_zero_rows_and_zero_inputs(built):
    packed = bf16_kernel.pack(torch.randn(20, 32).bfloat16())
    assert bf16_kernel.linear(torch.empty(0, 32, dtype=torch.bfloat16), packed, 20).shape == (0, 20)
    assert bf16_kernel.linear(torch.zeros(2, 32, dtype=torch.bfloat16), packed, 20).eq(0).all()


def test_packed_linear_takes_ours_for_few_rows_and_onednn_for_many(built):
    """Decode-sized products go through our kernel, prompt-sized ones through oneDNN's; both for the same weight,
    and the layer with COGNI_MAMBA_BF16=onednn keeps oneDNN's for every size."""
    linear = torch.nn.Linear(96, 40, bias=False).to(torch.bfloat16)
    layer = precision.PackedLinear(linear)
    assert layer.ours is not None and layer.ours_rows == bf16_kernel.max_rows(40, 96) >= 3
    few, many = torch.randn(3, 96).bfloat16(), torch.randn(bf16_kernel.MAX_ROWS + 1, 96).bfloat16()
    onednn = torch.ops.mkldnn._linear_pointwise
    for product in (layer, layer.kernel()):
        assert torch.equal(product(few), bf16_kernel.linear(few, layer.ours, 40))
        assert torch.equal(product(many), onednn(many, layer.packed, None, "none", [], ""))
    assert torch.equal(layer(few[None]), bf16_kernel.linear(few, layer.ours, 40)[None])  # (B, T, K) inputs too
    with bf16_kernel.onednn_instead():
        assert precision.PackedLinear(linear).ours is None
    assert bf16_kernel.max_rows(50304, 768) == bf16_kernel.LARGE_MAX_ROWS  # a vocabulary head: few rows only
