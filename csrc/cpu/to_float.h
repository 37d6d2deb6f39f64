// float16 / bfloat16 scales and zeros as float32 for the fused kernel
// (matmul_cpu.cpp's fused_rows): each thread converts its own rows' share in
// one pass, in place of two ops on the whole tensors before the kernel.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "isa.h"

#if defined(MPQ_X86_AVX2)
#include <immintrin.h>
#endif

namespace mpq::cpu {

// dst[i] = src[first + i] for i < n, as float32.
using ToFloat = void (*)(const void* src, int64_t first, int64_t n, float* dst);

template <typename S>
void to_float(const void* src, int64_t first, int64_t n, float* dst) {
  const S* p = static_cast<const S*>(src) + first;
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}

#if defined(MPQ_X86_AVX2)
// Eight at a time: F16C's conversion, and bfloat16's 16 bits moved to the top
// of a float32 (exact, as c10::BFloat16's conversion); the tail one by one.
MPQ_TARGET_AVX2 inline void half_to_float_avx2(const void* src, int64_t first, int64_t n,
                                               float* dst) {
  const c10::Half* p = static_cast<const c10::Half*>(src) + first;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}

MPQ_TARGET_AVX2 inline void bfloat16_to_float_avx2(const void* src, int64_t first, int64_t n,
                                                   float* dst) {
  const c10::BFloat16* p = static_cast<const c10::BFloat16*>(src) + first;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i v =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}
#endif

// The conversion for scales or zeros of dtype t (x's: float32, float16 or
// bfloat16); nullptr for float32, which the kernel reads in place.
inline ToFloat to_float_for(at::ScalarType t, bool avx2) {
  if (t == at::kFloat) return nullptr;
  TORCH_INTERNAL_ASSERT(t == at::kHalf || t == at::kBFloat16, "scales of dtype ", t);
#if defined(MPQ_X86_AVX2)
  if (avx2) return t == at::kHalf ? half_to_float_avx2 : bfloat16_to_float_avx2;
#else
  (void)avx2;
#endif
  return t == at::kHalf ? to_float<c10::Half> : to_float<c10::BFloat16>;
}

}  // namespace mpq::cpu
