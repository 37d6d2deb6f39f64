// Row dequantization on the CPU: W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g].
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <type_traits>

#include "dequantize_avx2.h"
#include "isa.h"

namespace mpq::cpu {

// Rows [n0, n1) of W into out (row stride K) for W-bit codes: the code width
// is a compile-time constant so that the shifts and the per-word loop unroll.
template <int W, typename scale_t, typename out_t>
void dequantize_rows_w(const int32_t* qweight, const scale_t* scales, const scale_t* zeros,
                       int64_t n0, int64_t n1, int64_t K, int64_t group_size, out_t* out) {
  constexpr int per_word = 32 / W;
  constexpr uint32_t mask = (1u << W) - 1u;
  const int64_t words = K / per_word;
  const int64_t groups = K / group_size;
  const int64_t words_per_group = group_size / per_word;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* qrow = qweight + n * words;
    out_t* orow = out + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = static_cast<float>(scales[n * groups + g]);
      const float z = static_cast<float>(zeros[n * groups + g]);
      const int64_t w0 = g * words_per_group;
      for (int64_t w = w0; w < w0 + words_per_group; ++w) {
        const uint32_t word = static_cast<uint32_t>(qrow[w]);
        out_t* o = orow + w * per_word;
        for (int j = 0; j < per_word; ++j) {
          const float q = static_cast<float>((word >> (j * W)) & mask);
          o[j] = static_cast<out_t>((q - z) * s);
        }
      }
    }
  }
}

// Writes rows [n0, n1) of W into out (row stride K). Arithmetic is float32,
// matching the CUDA kernels, so every backend rounds the same way; the AVX2
// build (avx2: use_avx2(), asked once per call) gives the same bits.
template <typename scale_t, typename out_t>
void dequantize_rows(const int32_t* qweight, const scale_t* scales, const scale_t* zeros,
                     int64_t n0, int64_t n1, int64_t K, int64_t w_bit, int64_t group_size,
                     out_t* out, bool avx2) {
  const auto rows = [&](auto width) {
    constexpr int W = decltype(width)::value;
#if defined(MPQ_X86_AVX2)
    if (avx2) return dequantize_rows_avx2<W>(qweight, scales, zeros, n0, n1, K, group_size, out);
#else
    (void)avx2;  // only x86-64 has a second build
#endif
    dequantize_rows_w<W>(qweight, scales, zeros, n0, n1, K, group_size, out);
  };
  switch (w_bit) {
    case 2: return rows(std::integral_constant<int, 2>{});
    case 4: return rows(std::integral_constant<int, 4>{});
    default: return rows(std::integral_constant<int, 8>{});
  }
}

// W [N, K] as a new tensor, in float32 (as_float) or in the scales' dtype,
// rows dequantized in parallel; q, s, z contiguous.
inline at::Tensor dequantize_tensor(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z,
                                    int64_t K, int64_t w_bit, int64_t group_size, bool as_float) {
  const int64_t N = q.size(0);
  auto out = at::empty({N, K}, as_float ? s.options().dtype(at::kFloat) : s.options());
  if (out.numel() == 0) return out;
  const bool avx2 = use_avx2();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "dequantize_tensor", [&] {
    const int32_t* qp = q.data_ptr<int32_t>();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      if (as_float) {
        dequantize_rows<scalar_t, float>(qp, sp, zp, n0, n1, K, w_bit, group_size,
                                         out.data_ptr<float>() + n0 * K, avx2);
      } else {
        dequantize_rows<scalar_t, scalar_t>(qp, sp, zp, n0, n1, K, w_bit, group_size,
                                            out.data_ptr<scalar_t>() + n0 * K, avx2);
      }
    });
  });
  return out;
}

}  // namespace mpq::cpu
