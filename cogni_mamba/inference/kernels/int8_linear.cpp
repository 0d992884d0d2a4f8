// int8 weights x fp32 activations for CPUs with AVX512-VNNI: y = x @ W.T with W (N, K) int8 and one scale per row.
//
// Each activation row is quantized on its own to 8 unsigned bits over its range [min(x, 0), max(x, 0)]: x ~ s * (u - z)
// with u in [0, 255] and z the code of 0 (as fbgemm quantizes a whole input), so a row's result does not depend on
// the rows beside it. The weights are stored once as (N / 16, K / 4, 16, 4): for 16 output rows, 4 consecutive
// inputs each, 64 bytes that one VPDPBUSD (unsigned activations x signed weights) multiplies by 4 broadcast
// activation bytes. A matrix-vector product then reads the weights as one sequential stream, which the hardware
// prefetcher follows at full memory speed. The zero point comes off at the end: sum (u - z) w = sum u w - z sum w.
//
// Built at first use by cogni_mamba/inference/int8_kernel.py (torch.utils.cpp_extension); the op is
// torch.ops.cogni_mamba.int8_linear(x, packed, row_sums, scale, out_features).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kRowBlock = 8;  // activation rows that share one pass over the weights

struct RowQuant {
  float scale;   // s
  int32_t zero;  // z: the code of 0.0
};

// One activation row to uint8 codes u = round(x / s) + z over [min(x, 0), max(x, 0)]; padding gets code z (zero).
RowQuant quantize_row(const float* x, int64_t K, int64_t padded, uint8_t* out) {
  __m512 vmax = _mm512_setzero_ps(), vmin = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 v = _mm512_loadu_ps(x + k);
    vmax = _mm512_max_ps(vmax, v);
    vmin = _mm512_min_ps(vmin, v);
  }
  float hi = _mm512_reduce_max_ps(vmax), lo = _mm512_reduce_min_ps(vmin);
  for (; k < K; ++k) {
    hi = std::max(hi, x[k]);
    lo = std::min(lo, x[k]);
  }
  const float s = hi > lo ? (hi - lo) / 255.0f : 1.0f;
  const int32_t z = std::min(255, std::max(0, static_cast<int32_t>(std::nearbyint(-lo / s))));
  const float inv = 1.0f / s;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i vz = _mm512_set1_epi32(z), v0 = _mm512_setzero_si512(), v255 = _mm512_set1_epi32(255);
  for (k = 0; k + 16 <= K; k += 16) {
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), vinv)), vz);  // ties to even
    q = _mm512_max_epi32(_mm512_min_epi32(q, v255), v0);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(q));
  }
  for (; k < K; ++k) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(x[k] * inv)) + z;
    out[k] = static_cast<uint8_t>(std::min(255, std::max(0, q)));
  }
  for (; k < padded; ++k) out[k] = static_cast<uint8_t>(z);
  return {s, z};
}

// Output blocks [b0, b1) (16 rows each) for M activation rows.
template <int M>
void blocks(const uint32_t* codes, int64_t Kq, const int8_t* packed, const int32_t* row_sums, const float* scale,
            const RowQuant* rq, float* y, int64_t N, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int8_t* w = packed + b * Kq * 64;
    __m512i acc[M][2];
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    int64_t q = 0;
    for (; q + 2 <= Kq; q += 2) {  // two accumulators per row: the adds of one chain overlap the other's
      const __m512i w0 = _mm512_loadu_si512(w + q * 64), w1 = _mm512_loadu_si512(w + (q + 1) * 64);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], _mm512_set1_epi32(static_cast<int>(codes[m * Kq + q])), w0);
        acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], _mm512_set1_epi32(static_cast<int>(codes[m * Kq + q + 1])), w1);
      }
    }
    if (q < Kq) {
      const __m512i w0 = _mm512_loadu_si512(w + q * 64);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], _mm512_set1_epi32(static_cast<int>(codes[m * Kq + q])), w0);
    }
    const __m512i sums = _mm512_loadu_si512(row_sums + b * 16);
    const __m512 sc = _mm512_loadu_ps(scale + b * 16);
    const int64_t n0 = b * 16;
    const __mmask16 keep = N - n0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - n0)) - 1);
    for (int m = 0; m < M; ++m) {
      const __m512i offset = _mm512_mullo_epi32(sums, _mm512_set1_epi32(rq[m].zero));  // z * the rows' weight sums
      const __m512i dot = _mm512_sub_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]), offset);
      const __m512 out = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(sc, _mm512_set1_ps(rq[m].scale)));
      _mm512_mask_storeu_ps(y + m * N + n0, keep, out);
    }
  }
}

// Rows [m0, m0 + M) of y for output blocks [b0, b1).
template <int M>
void row_group(const uint32_t* codes, int64_t Kq, const int8_t* packed, const int32_t* row_sums, const float* scale,
               const RowQuant* rq, float* y, int64_t N, int64_t m0, int64_t b0, int64_t b1) {
  blocks<M>(codes + m0 * Kq, Kq, packed, row_sums, scale, rq + m0, y + m0 * N, N, b0, b1);
}

// Each thread takes a run of output blocks and, a slice of them at a time (small enough to stay in L2), passes
// every group of activation rows over that slice: the weights come from memory once, whatever the row count.
void all_rows(const uint32_t* codes, int64_t rows, int64_t Kq, const int8_t* packed, const int32_t* row_sums,
              const float* scale, const RowQuant* rq, float* y, int64_t N, int64_t Nb) {
  const int64_t slice = std::max<int64_t>(1, (256 * 1024) / (Kq * 64));
  at::parallel_for(0, Nb, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b0 = begin; b0 < end; b0 += slice) {
      const int64_t b1 = std::min(end, b0 + slice);
      int64_t m0 = 0;
      for (; m0 + kRowBlock <= rows; m0 += kRowBlock)
        row_group<kRowBlock>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1);
      switch (rows - m0) {
        case 0: break;
        case 1: row_group<1>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
        case 2: row_group<2>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
        case 3: row_group<3>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
        case 4: row_group<4>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
        case 5: row_group<5>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
        case 6: row_group<6>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
        default: row_group<7>(codes, Kq, packed, row_sums, scale, rq, y, N, m0, b0, b1); break;
      }
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& row_sums,
                       const at::Tensor& scale, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.device().is_cpu(),
              "int8_linear takes 2-D fp32 CPU activations");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 4 && packed.scalar_type() == at::kChar &&
              packed.is_contiguous(),
              "int8_linear: packed weights must be contiguous int8 of shape (N/16, K/4, 16, 4)");
  const int64_t rows = x.size(0), K = x.size(1), Nb = packed.size(0), Kq = packed.size(1), N = out_features;
  TORCH_CHECK(K <= Kq * 4 && N <= Nb * 16 && N > (Nb - 1) * 16, "int8_linear: shapes do not match the packed weights");
  TORCH_CHECK(row_sums.scalar_type() == at::kInt && row_sums.numel() == Nb * 16 && row_sums.is_contiguous() &&
              scale.scalar_type() == at::kFloat && scale.numel() == Nb * 16 && scale.is_contiguous(),
              "int8_linear: row_sums (int32) and scale (fp32) need one entry per padded output row");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({rows, N}, x.options());
  if (rows == 0) return y;
  at::Tensor codes = at::empty({rows, Kq * 4}, x.options().dtype(at::kByte));
  std::vector<RowQuant> rq(rows);
  const float* xp = xc.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  for (int64_t m = 0; m < rows; ++m) rq[m] = quantize_row(xp + m * K, K, Kq * 4, cp + m * Kq * 4);
  all_rows(reinterpret_cast<const uint32_t*>(cp), rows, Kq, packed.data_ptr<int8_t>(), row_sums.data_ptr<int32_t>(),
           scale.data_ptr<float>(), rq.data(), y.data_ptr<float>(), N, Nb);
  return y;
}

}  // namespace

TORCH_LIBRARY(cogni_mamba, m) {
  m.def("int8_linear(Tensor x, Tensor packed, Tensor row_sums, Tensor scale, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(cogni_mamba, CPU, m) { m.impl("int8_linear", &int8_linear); }
