// bf16 weights x bf16 activations for CPUs with AVX512-BF16: y = x @ W.T, accumulated in fp32, returned in bf16.
//
// The weights are stored once as (N / 16, K / 2, 16, 2): for 16 output rows, 2 consecutive inputs each, 64 bytes
// that one VDPBF16PS multiplies by a broadcast pair of activations (x[k], x[k + 1]) into 16 fp32 sums. A matrix-
// vector product then reads the weights as one sequential stream, as the int8 kernel (int8_linear.cpp) does;
// oneDNN's bf16 product pays ~50 us a call on a nano-sized matrix-vector product that this reads in ~10.
// Every row is summed in the same order whatever its batch, so a row's result does not depend on the rows beside it.
//
// Built at first use by cogni_mamba/inference/bf16_kernel.py (torch.utils.cpp_extension); the op is
// torch.ops.cogni_mamba_bf16.bf16_linear(x, packed, out_features).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kRowBlock = 8;  // activation rows that share one pass over the weights

// Output blocks [b0, b1) (16 rows each) for M activation rows; x holds each row's K / 2 pairs as 32-bit words.
template <int M>
void blocks(const uint32_t* x, int64_t Kp, const uint16_t* packed, uint16_t* y, int64_t N, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t* w = packed + b * Kp * 32;
    __m512 acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    int64_t q = 0;
    for (; q + 2 <= Kp; q += 2) {  // two accumulators per row: the adds of one chain overlap the other's
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + q * 32), w1 = (__m512bh)_mm512_loadu_si512(w + (q + 1) * 32);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * Kp + q])), w0);
        acc[m][1] = _mm512_dpbf16_ps(acc[m][1], (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * Kp + q + 1])), w1);
      }
    }
    if (q < Kp) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + q * 32);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_set1_epi32(static_cast<int>(x[m * Kp + q])), w0);
    }
    const int64_t n0 = b * 16;
    const __mmask16 keep = N - n0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n0)) - 1);
    for (int m = 0; m < M; ++m) {
      const __m256bh out = _mm512_cvtneps_pbh(_mm512_add_ps(acc[m][0], acc[m][1]));  // round to nearest even
      _mm256_mask_storeu_epi16(y + m * N + n0, keep, (__m256i)out);
    }
  }
}

// Each thread takes a run of output blocks and, a slice of them at a time (small enough to stay in L2), passes
// every group of activation rows over that slice: the weights come from memory once, whatever the row count.
void all_rows(const uint32_t* x, int64_t rows, int64_t Kp, const uint16_t* packed, uint16_t* y, int64_t N, int64_t Nb) {
  const int64_t slice = std::max<int64_t>(1, (256 * 1024) / (Kp * 64));
  at::parallel_for(0, Nb, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = begin; b0 < end; b0 += slice) {
      const int64_t b1 = std::min(end, b0 + slice);
      int64_t m0 = 0;
      for (; m0 + kRowBlock <= rows; m0 += kRowBlock)
        blocks<kRowBlock>(x + m0 * Kp, Kp, packed, y + m0 * N, N, b0, b1);
      const uint32_t* xr = x + m0 * Kp;
      uint16_t* yr = y + m0 * N;
      switch (rows - m0) {
        case 0: break;
        case 1: blocks<1>(xr, Kp, packed, yr, N, b0, b1); break;
        case 2: blocks<2>(xr, Kp, packed, yr, N, b0, b1); break;
        case 3: blocks<3>(xr, Kp, packed, yr, N, b0, b1); break;
        case 4: blocks<4>(xr, Kp, packed, yr, N, b0, b1); break;
        case 5: blocks<5>(xr, Kp, packed, yr, N, b0, b1); break;
        case 6: blocks<6>(xr, Kp, packed, yr, N, b0, b1); break;
        default: blocks<7>(xr, Kp, packed, yr, N, b0, b1); break;
      }
    }
  });
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.device().is_cpu(),
              "bf16_linear takes 2-D bf16 CPU activations");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 2 &&
              packed.scalar_type() == at::kBFloat16 && packed.is_contiguous(),
              "bf16_linear: packed weights must be contiguous bf16 of shape (N/16, K/2, 16, 2)");
  const int64_t rows = x.size(0), K = x.size(1), Nb = packed.size(0), Kp = packed.size(1), N = out_features;
  TORCH_CHECK(K == Kp * 2 && N <= Nb * 16 && N > (Nb - 1) * 16, "bf16_linear: shapes do not match the packed weights");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({rows, N}, x.options());
  if (rows == 0) return y;
  all_rows(reinterpret_cast<const uint32_t*>(xc.data_ptr()), rows, Kp,
           reinterpret_cast<const uint16_t*>(packed.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()), N, Nb);
  return y;
}

}  // namespace

TORCH_LIBRARY(cogni_mamba_bf16, m) { m.def("bf16_linear(Tensor x, Tensor packed, int out_features) -> Tensor"); }

TORCH_LIBRARY_IMPL(cogni_mamba_bf16, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
