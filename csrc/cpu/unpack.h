// Row dequantization on the CPU: W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g].
#pragma once

#include <cstdint>

namespace mpq::cpu {

// Writes rows [n0, n1) of W into out (row stride K). Arithmetic is float32,
// matching the CUDA kernels, so every backend rounds the same way.
template <typename scale_t, typename out_t>
void dequantize_rows(const int32_t* qweight, const scale_t* scales, const scale_t* zeros,
                     int64_t n0, int64_t n1, int64_t K, int64_t w_bit, int64_t group_size,
                     out_t* out) {
  const int64_t per_word = 32 / w_bit;
  const int64_t words = K / per_word;
  const int64_t groups = K / group_size;
  const uint32_t mask = (1u << w_bit) - 1u;
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* qrow = qweight + n * words;
    out_t* orow = out + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = static_cast<float>(scales[n * groups + g]);
      const float z = static_cast<float>(zeros[n * groups + g]);
      for (int64_t w = g * group_size / per_word; w < (g + 1) * group_size / per_word; ++w) {
        const uint32_t word = static_cast<uint32_t>(qrow[w]);
        for (int64_t j = 0; j < per_word; ++j) {
          const float q = static_cast<float>((word >> (j * w_bit)) & mask);
          orow[w * per_word + j] = static_cast<out_t>((q - z) * s);
        }
      }
    }
  }
}

}  // namespace mpq::cpu
