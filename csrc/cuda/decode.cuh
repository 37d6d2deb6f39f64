// Packed codes -> fp16/bf16 pairs on the GPU.
//
// A 32-bit word holds P = 32 / W codes, code j at bits [W*j, W*j + W).
// Shifting the word right by W*j and masking with MASK | MASK << 16 leaves
// code j in the low half and code j + P/2 in the high half; OR-ing in the
// bits of a float16 (1024.0) or bfloat16 (128.0) whose last mantissa bit is
// worth 1 turns each half into magic + code exactly, and one packed subtract
// gives the codes as a pair of floats. One shift, one LOP3 and one HSUB2 per
// two codes (float16, 2- and 4-bit: one shift per byte, see decode_codes): no
// integer-to-float conversion instructions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace mpq::cuda {

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024.0, 1024.0)
  // Codes below 1024 fit under the magic value's mantissa.
  static constexpr int kMaxBits = 8;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // (128.0, 128.0)
  // bfloat16 has 7 mantissa bits: codes below 128 only, so 8-bit codes take
  // the float32 route below.
  static constexpr int kMaxBits = 7;
};

template <typename V>
__device__ __forceinline__ V as_pair(uint32_t bits) {
  return *reinterpret_cast<V*>(&bits);
}
template <typename V>
__device__ __forceinline__ uint32_t as_bits(V v) {
  return *reinterpret_cast<uint32_t*>(&v);
}

// (a & mask) | bits in one LOP3. Written as PTX because the compiler emits an
// AND and an OR when both constants are immediates (a LOP3 takes one).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
}

// Byte j of a word as a float32, via 2^23 + byte built with one byte permute.
__device__ __forceinline__ float code_float(uint32_t word, int j) {
  return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7440 + j)) - 8388608.f;
}

// Codes j and j + P/2 of a word (P = 32 / W) as the pair (magic + c_j,
// magic + c_{j+P/2}): one shift and one LOP3.
template <typename T, int W>
__device__ __forceinline__ typename Pair<T>::type biased_pair(uint32_t word, int j) {
  constexpr uint32_t kMask = (1u << W) - 1u;
  return as_pair<typename Pair<T>::type>(
      and_or(word >> (W * j), kMask | (kMask << 16), Pair<T>::kMagic));
}

// The P codes of one word as exact T pairs: out[j] = (c_j, c_{j+P/2}).
template <typename T, int W>
__device__ __forceinline__ void decode_codes(uint32_t word, typename Pair<T>::type* out) {
  using V = typename Pair<T>::type;
  constexpr int P = 32 / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  constexpr uint32_t kMask2 = kMask | (kMask << 16);
  if constexpr (std::is_same_v<T, __half> && W <= 4) {
    // float16 has room above 1024 for a code shifted left by up to 6 bits
    // (1024 + 64 * 3 < 2048 for 2-bit codes, 1024 + 16 * 15 for 4-bit), so the
    // codes at bit offsets 0..7 of each byte pair come out of one LOP3 each,
    // the shift undone by the packed multiply-add that removes the magic value:
    // one shift per byte instead of one per pair.
#pragma unroll
    for (int j = 0; j < P / 2; ++j) {
      const int bit = W * j, in = bit % 8;
      const uint32_t src = bit >= 8 ? word >> (bit - in) : word;
      const uint32_t v = and_or(src, kMask2 << in, Pair<T>::kMagic);
      if (in == 0) {
        out[j] = __hsub2(as_pair<V>(v), as_pair<V>(Pair<T>::kMagic));
      } else {
        const float f = 1.f / float(1 << in);
        out[j] = __hfma2(as_pair<V>(v), __float2half2_rn(f), __float2half2_rn(-1024.f * f));
      }
    }
  } else if constexpr (W <= Pair<T>::kMaxBits) {
    const V magic = as_pair<V>(Pair<T>::kMagic);
#pragma unroll
    for (int j = 0; j < P / 2; ++j)
      out[j] = __hsub2(biased_pair<T, W>(word, j), magic);
  } else {
    // bfloat16, 8-bit codes: build 2^23 + c as float32 with a byte permute;
    // every integer below 256 is exact in bfloat16.
#pragma unroll
    for (int j = 0; j < P / 2; ++j)
      out[j] = __floats2bfloat162_rn(code_float(word, j), code_float(word, j + P / 2));
  }
}

// Codes for late scaling (tile::WeightRows::codes), whose MMAs sum a * x over
// a step with a = kScale * (c + kBias), which apply() undoes with s / kScale
// and (z + kBias) * kScale in float32:
// - float16: the code itself as a subnormal, c * 2^-24 (the word masked,
//   nothing OR-ed in): exact and unbiased, one LOP3 per pair (8-bit codes:
//   one byte permute with zero bytes); codes at bit offsets 2..6 of a byte
//   come out times 4..64 (still subnormal), undone by one packed multiply.
//   (Biased by the magic value 1024 instead, the tensor cores' float32 sums
//   lost bits to 1024 * sum(x): H200, relative error of y against float64
//   600-680 ppm for 4-bit codes with x offset by 4 or 64, where the exact
//   codes and dequantize + cuBLAS gave 200-220; 2-bit codes 752 against 285.)
// - bfloat16, 4-bit codes: magic 128 + code (bfloat16's subnormals times x
//   fall below float32's normal range); no loss of accuracy measured.
// - bfloat16 otherwise: the exact codes (decode_codes).
template <typename T, int W>
struct LateCodes {
  static constexpr bool kSubnormal = std::is_same_v<T, __half>;
  static constexpr bool kBiased = !kSubnormal && W == 4;
  static constexpr float kScale = kSubnormal ? 0x1p-24f : 1.f;
  static constexpr float kBias = kBiased ? 128.f : 0.f;
};

// The P codes of one word as pairs out[j] = a(c_j), a(c_{j+P/2}) (LateCodes).
template <typename T, int W>
__device__ __forceinline__ void late_codes(uint32_t word, typename Pair<T>::type* out) {
  using V = typename Pair<T>::type;
  using C = LateCodes<T, W>;
  constexpr int P = 32 / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  if constexpr (C::kSubnormal && W == 8) {
    // bytes j and j + 2 over zero bytes (selector: byte j, 0, byte j + 2, 0)
#pragma unroll
    for (int j = 0; j < P / 2; ++j)
      out[j] = as_pair<V>(__byte_perm(word, 0u, 0x4240u + 0x0101u * j));
  } else if constexpr (C::kSubnormal) {
#pragma unroll
    for (int j = 0; j < P / 2; ++j) {
      const int bit = W * j, in = bit % 8;
      const uint32_t src = bit >= 8 ? word >> (bit - in) : word;
      const V v = as_pair<V>(src & ((kMask | (kMask << 16)) << in));
      out[j] = in == 0 ? v : __hmul2(v, __float2half2_rn(1.f / float(1 << in)));
    }
  } else if constexpr (C::kBiased) {
    // a shift and a LOP3 per pair (no room in a bfloat16 for a code at bit 4)
#pragma unroll
    for (int j = 0; j < P / 2; ++j) out[j] = biased_pair<T, W>(word, j);
  } else {
    decode_codes<T, W>(word, out);
  }
}

// 2-bit codes for gemm_kernel.cuh's COLS (late scaling over B columns, where MMA mi
// of a word takes pairs mi and mi + 4): pair j as (a(c_j), a(c_{j+8})) with
// one LOP3 per pair (bfloat16: and a shift for a quarter of them), no float
// instruction, a(c) = kUnit * (kBias + 2^shift(j % 4) * c):
// - float16: the code masked where it lies, at bit offset 2 (j % 4) of its
//   byte: c * 4^(j % 4) * 2^-24, a subnormal (exact, as LateCodes);
// - bfloat16: the magic value 128 OR-ed over it, 128 + c * 4^(j % 4), except
//   at offset 6, whose second bit would fall past bfloat16's 7 mantissa bits:
//   shifted down to offset 4 there (128 + 16 c).
// The caller undoes the factors in float32, once per step, and the bias with
// the sum of x weighted by kBias / 2^shift (gemm_kernel.cuh).
template <typename T>
struct ColsCodes {
  using V = typename Pair<T>::type;
  static constexpr bool kHalf = std::is_same_v<T, __half>;
  static constexpr float kUnit = kHalf ? 0x1p-24f : 1.f;
  static constexpr float kBias = kHalf ? 0.f : 128.f;
  __host__ __device__ static constexpr int shift(int c) { return kHalf || c < 3 ? 2 * c : 4; }
  __device__ __forceinline__ static void decode(uint32_t word, V* out) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int at = shift(j % 4);
      const uint32_t src = word >> ((j >= 4 ? 8 : 0) + 2 * (j % 4) - at);
      const uint32_t mask = (3u | (3u << 16)) << at;
      out[j] = as_pair<V>(kHalf ? src & mask : and_or(src, mask, Pair<T>::kMagic));
    }
  }
};

// -(z * s) as a pair, for dequantizing exact codes c as c * s - z * s in one
// packed FMA per pair instead of (c - z) * s in two. It is rounded once before
// the FMA: an error no larger than the result's own rounding (|z| and |c - z|
// are both below 2^W), where (c - z) * s rounds only the product (the
// difference is exact for float16), as mpq::dequantize does.
template <typename V>
__device__ __forceinline__ V neg_zero_scale(V s2, V z2) {
  return __hneg2(__hmul2(z2, s2));
}

// Dequantizes the P codes of one word. FMA: out[j] = (c_j, c_{j+P/2}) * s -
// z * s with zz2 = neg_zero_scale(s2, z). Else zz2 = z and out[j] = (c - z) *
// s, one instruction more per pair, rounded once for float16 (what
// mpq::dequantize returns); bfloat16 may round twice. bfloat16 with 8-bit
// codes goes through float32 (zf, sf) either way.
template <typename T, int W, bool FMA>
__device__ __forceinline__ void dequant_word(uint32_t word, typename Pair<T>::type s2,
                                             typename Pair<T>::type zz2, float zf, float sf,
                                             typename Pair<T>::type* out) {
  constexpr int P = 32 / W;
  if constexpr (W <= Pair<T>::kMaxBits) {
    decode_codes<T, W>(word, out);
#pragma unroll
    for (int j = 0; j < P / 2; ++j)
      out[j] = FMA ? __hfma2(out[j], s2, zz2) : __hmul2(__hsub2(out[j], zz2), s2);
  } else {
#pragma unroll
    for (int j = 0; j < P / 2; ++j)
      out[j] = __floats2bfloat162_rn((code_float(word, j) - zf) * sf,
                                     (code_float(word, j + P / 2) - zf) * sf);
  }
}

}  // namespace mpq::cuda
