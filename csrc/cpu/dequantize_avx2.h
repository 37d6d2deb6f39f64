// Row dequantization in the AVX2 build (isa.h): eight weights per vector, the
// same float32 arithmetic as dequantize_rows_w ((q - z) * s, rounded once
// each), then float32, float16 (F16C, round to nearest even) or bfloat16
// (round to nearest even, NaN as 0x7FC0, as c10::BFloat16 rounds) stored
// eight at a time: the same bits as the scalar form. On a 2-core EPYC
// (scripts/bench_cpu_dequantize.py, g64, a new W per call; the baseline build
// is the scalar form) 576 x 1536 float16 W in 122-141 us against 1039-1089,
// bfloat16 141-158 against 269-544, float32 127-158 against 148-199, where a
// copy of W took 113-136 us (16-bit) and 166-198 (float32); and the blocked
// matmul, which dequantizes into float32, on one thread 2048 x 2048 M = 32
// 3897-3951 us against 4316-4717 (fp32 F.linear 4030-4059;
// scripts/bench_cpu.py --threads 1).
#pragma once

#include "isa.h"

#if defined(MPQ_X86_AVX2)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>

// The helpers below take and return AVX vectors; they are built for AVX2
// only and called only from AVX2 code (GCC's -Wpsabi note does not apply).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mpq::cpu {

// Eight floats into out_t.
template <typename out_t>
MPQ_TARGET_AVX2 inline void store8_avx2(out_t* out, __m256 v) {
  if constexpr (std::is_same_v<out_t, float>) {
    _mm256_storeu_ps(out, v);
  } else if constexpr (std::is_same_v<out_t, double>) {
    _mm256_storeu_pd(out, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    _mm256_storeu_pd(out + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  } else if constexpr (std::is_same_v<out_t, c10::Half>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                     _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    static_assert(std::is_same_v<out_t, c10::BFloat16>, "float, double, Half or BFloat16");
    // Round to nearest even on the upper 16 bits; NaN as the quiet 0x7FC0.
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // 32 -> 16 bits: packus works per 128-bit half; the permute joins the halves.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(packed));
  }
}

// (q - z) * s for eight codes.
MPQ_TARGET_AVX2 inline __m256 weights8(__m256i codes, __m256 z, __m256 s) {
  return _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(codes), z), s);
}

// Rows [n0, n1) of W into out (row stride K): 2- and 4-bit codes eight of a
// word per vector (one variable shift per lane, a mask, a conversion), 8-bit
// codes the eight bytes of two words (one zero-extension). Groups and K are
// multiples of 32 (checks.cpp), so a group is whole vectors.
template <int W, typename scale_t, typename out_t>
MPQ_TARGET_AVX2 void dequantize_rows_avx2(const int32_t* qweight, const scale_t* scales,
                                          const scale_t* zeros, int64_t n0, int64_t n1,
                                          int64_t K, int64_t group_size, out_t* out) {
  constexpr int P = 32 / W;
  const int64_t words = K / P;
  const int64_t groups = K / group_size;
  const int64_t words_per_group = group_size / P;
  const __m256i mask = _mm256_set1_epi32((1 << W) - 1);
  const __m256i shift0 = _mm256_setr_epi32(0, W, 2 * W, 3 * W, 4 * W, 5 * W, 6 * W, 7 * W);
  const __m256i shift1 = _mm256_add_epi32(shift0, _mm256_set1_epi32(8 * W));
  for (int64_t n = n0; n < n1; ++n) {
    const int32_t* qrow = qweight + n * words;
    out_t* orow = out + (n - n0) * K;
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s = _mm256_set1_ps(static_cast<float>(scales[n * groups + g]));
      const __m256 z = _mm256_set1_ps(static_cast<float>(zeros[n * groups + g]));
      const int64_t w0 = g * words_per_group, w1 = w0 + words_per_group;
      if constexpr (W == 8) {
        for (int64_t w = w0; w < w1; w += 2) {
          const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qrow + w));
          store8_avx2(orow + w * P, weights8(_mm256_cvtepu8_epi32(bytes), z, s));
        }
      } else {
        for (int64_t w = w0; w < w1; ++w) {
          const __m256i word = _mm256_set1_epi32(qrow[w]);
          const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(word, shift0), mask);
          store8_avx2(orow + w * P, weights8(lo, z, s));
          if constexpr (W == 2) {
            const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(word, shift1), mask);
            store8_avx2(orow + w * P + 8, weights8(hi, z, s));
          }
        }
      }
    }
  }
}

}  // namespace mpq::cpu

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#endif  // MPQ_X86_AVX2
