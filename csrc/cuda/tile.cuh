// Pieces shared by the fused kernels (gemv.cuh, gemm.cuh): streaming loads,
// the m16n8k16 tensor-core MMA, and split-K over a float32 workspace.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "decode.cuh"

namespace mpq::cuda::tile {

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
  // Weights are read once: keep them out of L1, which serves x.
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

// The weight side of a warp's RT tiles of 16 output features, as both fused
// kernels walk it: lane (g, t) owns rows g and g + 8 of each tile and reads a
// 16-byte chunk of each per step of SUPER_K inputs (a quad of lanes covers 64
// contiguous bytes of a row). Rows past N read row 0 and are never stored.
template <typename T, int W, int RT>
struct WeightRows {
  using V = typename Pair<T>::type;
  static constexpr int P = 32 / W;            // codes per word
  static constexpr int LANE_K = 4 * P;        // codes per lane per row per step
  static constexpr int SUPER_K = 4 * LANE_K;  // inputs per step
  static constexpr int R = 2 * RT;            // rows of W per lane
  static constexpr int HALVES = W == 2 ? 2 : 1;  // groups a lane's chunk spans
  // Everything a step reads from W's side, so that it can be loaded ahead:
  // the packed words of the lane's rows and their scales and zeros.
  struct Step {
    uint4 w[R];
    T s[R][HALVES], z[R][HALVES];
  };

  int row[R];
  const uint4* q[R];
  const T* sp[R];
  const T* zp[R];
  int t, group_size;

  __device__ __forceinline__ WeightRows(const uint32_t* qweight, const T* scales, const T* zeros,
                                        int tile0, int g, int t_, int N, int K, int group_size_)
      : t(t_), group_size(group_size_) {
    const int words = K / P, groups = K / group_size_;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      row[r] = tile0 + (r >> 1) * 16 + (r & 1) * 8 + g;
      const int safe = row[r] < N ? row[r] : 0;
      q[r] = reinterpret_cast<const uint4*>(qweight + (size_t)safe * words) + t_;
      sp[r] = scales + (size_t)safe * groups;
      zp[r] = zeros + (size_t)safe * groups;
    }
  }

  __device__ __forceinline__ void load(int s, Step& st) const {
#pragma unroll
    for (int r = 0; r < R; ++r) st.w[r] = load_stream(q[r] + s * 4);
    const int k0 = s * SUPER_K + t * LANE_K;
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
      const int grp = (k0 + 32 * h) / group_size;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        st.s[r][h] = sp[r][grp];
        st.z[r][h] = zp[r][grp];
      }
    }
  }

  // Word j (0..3) of every row of a loaded step, dequantized: d[r][i] =
  // (c_i, c_{i+P/2}). A lane's 16 bytes hold 32 (w4) or 16 (w8) codes, one
  // group, as groups are multiples of 32 and aligned; 2-bit chunks hold two.
  __device__ __forceinline__ static void dequant(const Step& st, int j, V (&d)[R][P / 2]) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int h = (W == 2 && j >= 2) ? 1 : 0;
      const T sc = st.s[r][h], zc = st.z[r][h];
      dequant_word<T, W>((&st.w[r].x)[j], V{zc, zc}, V{sc, sc}, float(zc), float(sc), d[r]);
    }
  }

  // The MMAs of pair mi of word j against one x tile: A = rows (g, g+8) of
  // tile rt x pairs 2mi and 2mi+1; B = (b0, b1).
  __device__ __forceinline__ static void mma(float (&acc)[RT][4], const V (&d)[R][P / 2], int mi,
                                             uint32_t b0, uint32_t b1) {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
      const uint32_t a[4] = {as_bits(d[2 * rt][2 * mi]), as_bits(d[2 * rt + 1][2 * mi]),
                             as_bits(d[2 * rt][2 * mi + 1]), as_bits(d[2 * rt + 1][2 * mi + 1])};
      mma_16816<T>(acc[rt], a, b0, b1);
    }
  }

  // Writes the accumulators of x rows m0 + [0, 8 * N_TILES): c0, c1 are row g,
  // x rows 2t, 2t+1 of a tile; c2, c3 row g + 8. Into y (+ bias, one rounding)
  // or, with a workspace, into split `split` of it: every (split, m, n) is
  // written by exactly one lane, so no atomics and no memset.
  template <int N_TILES>
  __device__ __forceinline__ void store(const float (&acc)[N_TILES][RT][4], int m0, int M, int N,
                                        int split, float* ws, const T* bias, T* y) const {
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) {
#pragma unroll
      for (int nt = 0; nt < N_TILES; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int n = row[2 * rt + (i >> 1)];
          const int m = m0 + nt * 8 + 2 * t + (i & 1);
          if (n < N && m < M) {
            if (ws != nullptr) {
              ws[((size_t)split * M + m) * N + n] = acc[nt][rt][i];
            } else {
              float v = acc[nt][rt][i];
              if (bias != nullptr) v += float(bias[n]);
              y[(size_t)m * N + n] = T(v);
            }
          }
        }
      }
    }
  }
};

// y = T(sum of the splits' partial products + bias): the end of a split-K product.
template <typename T>
__global__ void finish_split_kernel(const float* __restrict__ ws, const T* __restrict__ bias,
                                    T* __restrict__ y, int64_t total, int N, int splits) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int sp = 0; sp < splits; ++sp) v += ws[sp * total + i];
    if (bias != nullptr) v += float(bias[i % N]);
    y[i] = T(v);
  }
}

template <typename T>
void finish_split(const at::Tensor& ws, const T* bias, at::Tensor& y, int splits,
                  cudaStream_t stream) {
  const int64_t total = y.numel();
  const int blocks = (int)std::min<int64_t>((total + 255) / 256, 4096);
  finish_split_kernel<T><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), bias,
                                                      reinterpret_cast<T*>(y.data_ptr()), total,
                                                      (int)y.size(1), splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Number of K splits (at most max_splits) for a grid of `blocks` blocks, each
// walking `steps` steps, on `slots` resident-block slots: the one whose waves
// are busiest, as a second wave that is mostly empty costs as much as a full
// one, and a grid that leaves SMs idle gets no credit.
inline int wave_filling_splits(long blocks, int steps, int slots, int max_splits) {
  int splits = 1;
  double best = -1.0;
  for (int sp = 1; sp <= max_splits; ++sp) {
    const int per = (steps + sp - 1) / sp;
    const int real = (steps + per - 1) / per;
    const long total = blocks * real;
    const long waves = (total + slots - 1) / slots;
    const double score = (double)total / (waves * slots) - (total < slots ? 1.0 : 0.0);
    if (score > best + 1e-9) {
      best = score;
      splits = real;
    }
  }
  return splits;
}

}  // namespace mpq::cuda::tile
