// float16 / bfloat16 to float32 and back for the fused kernel (matmul_cpu.cpp's
// fused_rows): scales and zeros converted by each thread for its own rows, x
// before the kernel, y's float32 sums by each thread for its own columns, in
// place of ops on the whole tensors around the kernel.
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

// dst[first + i] = src[i] for i < n, rounded to the nearest even as
// c10::Half's and c10::BFloat16's conversions do.
using FromFloat = void (*)(const float* src, int64_t n, void* dst, int64_t first);

template <typename D>
void from_float(const float* src, int64_t n, void* dst, int64_t first) {
  D* p = static_cast<D*>(dst) + first;
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<D>(src[i]);
}

#if defined(MPQ_X86_AVX2)
// Eight at a time: F16C's conversion (NaN stays NaN, its payload aside), and
// bfloat16's rounding as c10 writes it: add 0x7FFF plus the lowest bit kept,
// keep the top 16 bits, 0x7FC0 for NaN.
MPQ_TARGET_AVX2 inline void float_to_half_avx2(const float* src, int64_t n, void* dst,
                                               int64_t first) {
  c10::Half* p = static_cast<c10::Half*>(dst) + first;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) p[i] = static_cast<c10::Half>(src[i]);
}

MPQ_TARGET_AVX2 inline void float_to_bfloat16_avx2(const float* src, int64_t n, void* dst,
                                                   int64_t first) {
  c10::BFloat16* p = static_cast<c10::BFloat16*>(dst) + first;
  const __m256i one = _mm256_set1_epi32(1), half_ulp = _mm256_set1_epi32(0x7FFF);
  const __m256i qnan = _mm256_set1_epi32(0x7FC0);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, half_ulp)), 16);
    r = _mm256_blendv_epi8(r, qnan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    // 32 -> 16 bits: packus works within 128-bit halves, the permute joins them.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), _mm256_castsi256_si128(packed));
  }
  for (; i < n; ++i) p[i] = static_cast<c10::BFloat16>(src[i]);
}
#endif

// The conversion from float32 to dtype t (x's: float16 or bfloat16).
inline FromFloat from_float_for(at::ScalarType t, bool avx2) {
  TORCH_INTERNAL_ASSERT(t == at::kHalf || t == at::kBFloat16, "output of dtype ", t);
#if defined(MPQ_X86_AVX2)
  if (avx2) return t == at::kHalf ? float_to_half_avx2 : float_to_bfloat16_avx2;
#else
  (void)avx2;
#endif
  return t == at::kHalf ? from_float<c10::Half> : from_float<c10::BFloat16>;
}

// The conversion for x, scales, zeros or bias of dtype t (x's: float32,
// float16 or bfloat16); nullptr for float32, which the kernel reads in place.
inline ToFloat to_float_for(at::ScalarType t, bool avx2) {
  if (t == at::kFloat) return nullptr;
  TORCH_INTERNAL_ASSERT(t == at::kHalf || t == at::kBFloat16, "input of dtype ", t);
#if defined(MPQ_X86_AVX2)
  if (avx2) return t == at::kHalf ? half_to_float_avx2 : bfloat16_to_float_avx2;
#else
  (void)avx2;
#endif
  return t == at::kHalf ? to_float<c10::Half> : to_float<c10::BFloat16>;
}

}  // namespace mpq::cpu
