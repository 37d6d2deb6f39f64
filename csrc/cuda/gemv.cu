// Fused dequantize + matmul for few rows of x (M <= 64), on tensor cores.
//
// y[m, n] = sum_k x[m, k] * W[n, k]. Each block owns 16 output features
// (rows of W) and its warps split K; each warp step covers SUPER_K inputs:
// lane (g = lane / 4, t = lane % 4) loads 16 bytes of packed codes from rows
// g and g + 8 (a quad of lanes reads 64 contiguous bytes of a row), turns them
// into fp16/bf16 weights in registers (decode.cuh) and feeds them as the A
// operand of mma.m16n8k16 with float32 accumulation; x is the B operand, one
// 8-column tile per 8 rows of x.
//
// The k order inside an MMA is free as long as A and B agree, so each lane
// keeps its own 16-byte chunk: the weights come out of the decoder as pairs
// (c_j, c_{j+P/2}) of one word and the lane builds the matching x pairs from
// the same k. Partial sums of the warps are added in shared memory; bias is
// added in float32 before the one rounding of the output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>

#include "decode.cuh"
#include "kernels.h"

namespace mpq::cuda {

namespace {

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  // Weights are read once: keep them out of L1.
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

template <typename T>
__device__ __forceinline__ void mma_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(T lo, T hi) {
  typename Pair<T>::type v;
  v.x = lo;
  v.y = hi;
  return as_bits(v);
}

template <typename T, int W, int N_TILES, int WARPS>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_cuda_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                     const T* __restrict__ scales, const T* __restrict__ zeros,
                     const T* __restrict__ bias, T* __restrict__ y, int M, int N, int K,
                     int group_size) {
  using V = typename Pair<T>::type;
  constexpr int P = 32 / W;            // codes per word
  constexpr int LANE_K = 4 * P;        // codes per lane per row (16 bytes)
  constexpr int SUPER_K = 4 * LANE_K;  // inputs per warp step
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int ra = blockIdx.x * 16 + g, rb = ra + 8;
  const bool va = ra < N, vb = rb < N;
  const int words = K / P;
  const int groups = K / group_size;
  const uint4* qa = reinterpret_cast<const uint4*>(qweight + (size_t)(va ? ra : 0) * words);
  const uint4* qb = reinterpret_cast<const uint4*>(qweight + (size_t)(vb ? rb : 0) * words);
  const T* sa = scales + (size_t)(va ? ra : 0) * groups;
  const T* sb = scales + (size_t)(vb ? rb : 0) * groups;
  const T* za = zeros + (size_t)(va ? ra : 0) * groups;
  const T* zb = zeros + (size_t)(vb ? rb : 0) * groups;

  float acc[N_TILES][4];
#pragma unroll
  for (int i = 0; i < N_TILES; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  const int steps = K / SUPER_K;
  int s = warp;
  uint4 na = {0, 0, 0, 0}, nb = {0, 0, 0, 0};
  if (s < steps) {
    na = load_stream(qa + s * 4 + t);
    nb = load_stream(qb + s * 4 + t);
  }
  for (; s < steps; s += WARPS) {
    const uint4 wa = na, wb = nb;
    // Issue the next step's loads before this step's arithmetic.
    if (s + WARPS < steps) {
      na = load_stream(qa + (s + WARPS) * 4 + t);
      nb = load_stream(qb + (s + WARPS) * 4 + t);
    }
    const int k0 = s * SUPER_K + t * LANE_K;
    const uint32_t wa_w[4] = {wa.x, wa.y, wa.z, wa.w};
    const uint32_t wb_w[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kw = k0 + j * P;
      // A word never straddles groups (P <= 16 and groups are multiples of 32);
      // for 4 and 8 bits the whole chunk shares one group, and the reloads hit L1.
      const int grp = kw / group_size;
      const T s_a = sa[grp], z_a = za[grp], s_b = sb[grp], z_b = zb[grp];
      V da[P / 2], db[P / 2];
      dequant_word<T, W>(wa_w[j], V{z_a, z_a}, V{s_a, s_a}, float(z_a), float(s_a), da);
      dequant_word<T, W>(wb_w[j], V{z_b, z_b}, V{s_b, s_b}, float(z_b), float(s_b), db);
      // x[m, kw .. kw + P) for the 8 rows m of each tile that this lane feeds.
      T xs[N_TILES][P];
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt) {
        const int m = nt * 8 + g;
        if (m < M) {
          const T* xp = x + (size_t)m * K + kw;
          if constexpr (P == 4) {
            const uint2 v = *reinterpret_cast<const uint2*>(xp);
            *reinterpret_cast<uint2*>(xs[nt]) = v;
          } else {
#pragma unroll
            for (int q = 0; q < P / 8; ++q)
              reinterpret_cast<uint4*>(xs[nt])[q] = reinterpret_cast<const uint4*>(xp)[q];
          }
        } else {
#pragma unroll
          for (int q = 0; q < P; ++q) xs[nt][q] = T(0.f);
        }
      }
#pragma unroll
      for (int mi = 0; mi < P / 4; ++mi) {
        // A: rows (g, g+8) x pairs 2mi and 2mi+1 of this word.
        const uint32_t a[4] = {as_bits(da[2 * mi]), as_bits(db[2 * mi]), as_bits(da[2 * mi + 1]),
                               as_bits(db[2 * mi + 1])};
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt) {
          const uint32_t b0 = pack_pair<T>(xs[nt][2 * mi], xs[nt][2 * mi + P / 2]);
          const uint32_t b1 = pack_pair<T>(xs[nt][2 * mi + 1], xs[nt][2 * mi + 1 + P / 2]);
          mma_16816<T>(acc[nt], a, b0, b1);
        }
      }
    }
  }

  // Sum the warps' partial results.
  __shared__ float red[WARPS][N_TILES][4][32];
#pragma unroll
  for (int nt = 0; nt < N_TILES; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp][nt][i][lane] = acc[nt][i];
  __syncthreads();
  for (int idx = threadIdx.x; idx < N_TILES * 4 * 32; idx += WARPS * 32) {
    const int nt = idx / 128, i = (idx / 32) % 4, l = idx % 32;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) v += red[w][nt][i][l];
    // c0, c1: row g, columns 2t, 2t+1; c2, c3: row g + 8.
    const int row = blockIdx.x * 16 + (l >> 2) + (i >= 2 ? 8 : 0);
    const int m = nt * 8 + (l & 3) * 2 + (i & 1);
    if (row < N && m < M) {
      if (bias != nullptr) v += float(bias[row]);
      y[(size_t)m * N + row] = T(v);
    }
  }
}

template <typename T, int W, int N_TILES>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
            int64_t group_size) {
  constexpr int WARPS = 8;
  const int M = x.size(0), K = x.size(1), N = qweight.size(0);
  const dim3 grid((N + 15) / 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  gemv_cuda_kernel<T, W, N_TILES, WARPS><<<grid, WARPS * 32, 0, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()),
      reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), reinterpret_cast<const T*>(zeros.data_ptr()),
      bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr,
      reinterpret_cast<T*>(y.data_ptr()), M, N, K, static_cast<int>(group_size));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int W>
void dispatch_tiles(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                    at::Tensor& y, int64_t group_size) {
  const int64_t M = x.size(0);
  if (M <= 8) return launch<T, W, 1>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 16) return launch<T, W, 2>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 32) return launch<T, W, 4>(x, qweight, scales, zeros, bias, y, group_size);
  return launch<T, W, 8>(x, qweight, scales, zeros, bias, y, group_size);
}

template <typename T>
void dispatch_bits(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                   int64_t w_bit, int64_t group_size) {
  switch (w_bit) {
    case 2: return dispatch_tiles<T, 2>(x, qweight, scales, zeros, bias, y, group_size);
    case 4: return dispatch_tiles<T, 4>(x, qweight, scales, zeros, bias, y, group_size);
    default: return dispatch_tiles<T, 8>(x, qweight, scales, zeros, bias, y, group_size);
  }
}

}  // namespace

bool gemv_supported(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit) {
  const int64_t K = x.size(1);
  const int64_t super_k = 4 * 4 * (32 / w_bit);
  const auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  return (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) &&
         x.size(0) <= kGemvMaxRows && K % super_k == 0 && aligned(x) && aligned(qweight);
}

void gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size) {
  if (x.scalar_type() == at::kHalf) {
    dispatch_bits<__half>(x, qweight, scales, zeros, bias, y, w_bit, group_size);
  } else {
    dispatch_bits<__nv_bfloat16>(x, qweight, scales, zeros, bias, y, w_bit, group_size);
  }
}

}  // namespace mpq::cuda
