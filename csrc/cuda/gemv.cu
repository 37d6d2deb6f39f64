// Fused dequantize + matmul for few rows of x (M <= 64), on tensor cores.
//
// y[m, n] = sum_k x[m, k] * W[n, k]. Each warp owns 16 output features (rows
// of W); the WARPS warps of a block own consecutive row tiles and walk the
// same range of K together, so the x values they read are shared through L1
// instead of being fetched from L2 once per 16 rows. When there are too few
// row tiles to fill the GPU, K is split across blockIdx.y: each split writes
// its partial sums to a float32 workspace and a small kernel adds them up.
//
// A warp step covers SUPER_K inputs: lane (g = lane / 4, t = lane % 4) loads
// 16 bytes of packed codes from rows g and g + 8 (a quad of lanes reads 64
// contiguous bytes of a row), turns them into fp16/bf16 weights in registers
// (decode.cuh) and feeds them as the A operand of mma.m16n8k16 with float32
// accumulation; x is the B operand, one 8-column tile per 8 rows of x. The
// next U steps' weights are loaded before the current ones are used.
//
// The k order inside an MMA is free as long as A and B agree, so each lane
// keeps its own 16-byte chunk: the weights come out of the decoder as pairs
// (c_j, c_{j+P/2}) of one word and the lane builds the matching x pairs from
// the same k. Bias is added in float32 before the one rounding of the output.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "decode.cuh"
#include "kernels.h"

namespace mpq::cuda {

namespace {

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

template <typename T, int W, int N_TILES, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_cuda_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                     const T* __restrict__ scales, const T* __restrict__ zeros,
                     const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                     int M, int N, int K, int group_size, int steps_per_split) {
  using V = typename Pair<T>::type;
  constexpr int P = 32 / W;            // codes per word
  constexpr int LANE_K = 4 * P;        // codes per lane per row (16 bytes)
  constexpr int SUPER_K = 4 * LANE_K;  // inputs per warp step
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = (blockIdx.x * WARPS + warp) * 16;
  if (tile >= N) return;  // no block-wide barrier below
  const int ra = tile + g, rb = ra + 8;
  const bool va = ra < N, vb = rb < N;
  const int words = K / P;
  const int groups = K / group_size;
  const uint4* qa = reinterpret_cast<const uint4*>(qweight + (size_t)(va ? ra : 0) * words) + t;
  const uint4* qb = reinterpret_cast<const uint4*>(qweight + (size_t)(vb ? rb : 0) * words) + t;
  const T* sa = scales + (size_t)(va ? ra : 0) * groups;
  const T* sb = scales + (size_t)(vb ? rb : 0) * groups;
  const T* za = zeros + (size_t)(va ? ra : 0) * groups;
  const T* zb = zeros + (size_t)(vb ? rb : 0) * groups;

  float acc[N_TILES][4];
#pragma unroll
  for (int i = 0; i < N_TILES; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;

  const int s_begin = blockIdx.y * steps_per_split;
  const int s_end = min(K / SUPER_K, s_begin + steps_per_split);
  // Everything a step reads from memory, so that it can be loaded U steps ahead:
  // the packed words of rows g and g+8, their scales and zeros (two groups
  // for 2-bit chunks) and, for one x tile, this lane's x values.
  constexpr int HALVES = W == 2 ? 2 : 1;
  // Prefetching x into registers costs more occupancy than it saves: x is
  // shared by the block's warps through L1.
  constexpr bool PREFETCH_X = false;
  struct Step {
    uint4 wa, wb;
    T s_a[HALVES], z_a[HALVES], s_b[HALVES], z_b[HALVES];
    uint4 xv[PREFETCH_X ? LANE_K / 8 : 1];
  };
  const auto load_step = [&](int s, Step& st) {
    st.wa = load_stream(qa + s * 4);
    st.wb = load_stream(qb + s * 4);
    const int k0 = s * SUPER_K + t * LANE_K;
#pragma unroll
    for (int h = 0; h < HALVES; ++h) {
      const int grp = (k0 + 32 * h) / group_size;
      st.s_a[h] = sa[grp];
      st.z_a[h] = za[grp];
      st.s_b[h] = sb[grp];
      st.z_b[h] = zb[grp];
    }
    if constexpr (PREFETCH_X) {
      if (g < M) {
        const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)g * K + k0);
#pragma unroll
        for (int q = 0; q < LANE_K / 8; ++q) st.xv[q] = xp[q];
      } else {
#pragma unroll
        for (int q = 0; q < LANE_K / 8; ++q) st.xv[q] = make_uint4(0, 0, 0, 0);
      }
    }
  };
  Step next[U];
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (s_begin + u < s_end) load_step(s_begin + u, next[u]);
  for (int s = s_begin; s < s_end; s += U) {
    Step cur[U];
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = next[u];
    // Issue the next U steps' loads before this step's arithmetic.
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (s + U + u < s_end) load_step(s + U + u, next[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s + u >= s_end) break;
      const Step& st = cur[u];
      const int k0 = (s + u) * SUPER_K + t * LANE_K;
      const uint32_t wa_w[4] = {st.wa.x, st.wa.y, st.wa.z, st.wa.w};
      const uint32_t wb_w[4] = {st.wb.x, st.wb.y, st.wb.z, st.wb.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int kw = k0 + j * P;
        // A lane's 16 bytes hold 32 (w4) or 16 (w8) codes: one group, as groups
        // are multiples of 32 and aligned; 2-bit chunks hold two halves of 32.
        const int h = (W == 2 && j >= 2) ? 1 : 0;
        const T s_a = st.s_a[h], z_a = st.z_a[h], s_b = st.s_b[h], z_b = st.z_b[h];
        V da[P / 2], db[P / 2];
        dequant_word<T, W>(wa_w[j], V{z_a, z_a}, V{s_a, s_a}, float(z_a), float(s_a), da);
        dequant_word<T, W>(wb_w[j], V{z_b, z_b}, V{s_b, s_b}, float(z_b), float(s_b), db);
        // x[m, kw .. kw + P) for the 8 rows m of each tile that this lane feeds.
        T xs[N_TILES][P];
        if constexpr (PREFETCH_X) {
#pragma unroll
          for (int q = 0; q < P; ++q) xs[0][q] = reinterpret_cast<const T*>(st.xv)[j * P + q];
        } else {
#pragma unroll
          for (int nt = 0; nt < N_TILES; ++nt) {
            const int m = nt * 8 + g;
            if (m < M) {
              const T* xp = x + (size_t)m * K + kw;
              if constexpr (P == 4) {
                *reinterpret_cast<uint2*>(xs[nt]) = *reinterpret_cast<const uint2*>(xp);
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
        }
#pragma unroll
        for (int mi = 0; mi < P / 4; ++mi) {
          // A: rows (g, g+8) x pairs 2mi and 2mi+1 of this word.
          const uint32_t a[4] = {as_bits(da[2 * mi]), as_bits(db[2 * mi]),
                                 as_bits(da[2 * mi + 1]), as_bits(db[2 * mi + 1])};
#pragma unroll
          for (int nt = 0; nt < N_TILES; ++nt) {
            const uint32_t b0 = pack_pair<T>(xs[nt][2 * mi], xs[nt][2 * mi + P / 2]);
            const uint32_t b1 = pack_pair<T>(xs[nt][2 * mi + 1], xs[nt][2 * mi + 1 + P / 2]);
            mma_16816<T>(acc[nt], a, b0, b1);
          }
        }
      }
    }
  }

  // c0, c1: row g, columns (rows of x) 2t, 2t+1; c2, c3: row g + 8.
#pragma unroll
  for (int nt = 0; nt < N_TILES; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = i < 2 ? ra : rb;
      const int m = nt * 8 + 2 * t + (i & 1);
      if (row < N && m < M) {
        if (ws != nullptr) {
          // Every (split, m, row) is written by exactly one lane: no atomics, no memset.
          ws[((size_t)blockIdx.y * M + m) * N + row] = acc[nt][i];
        } else {
          float v = acc[nt][i];
          if (bias != nullptr) v += float(bias[row]);
          y[(size_t)m * N + row] = T(v);
        }
      }
    }
  }
}

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

int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

template <typename T, int W, int N_TILES>
void launch(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
            int64_t group_size) {
  constexpr int WARPS = 4, U = 2;
  constexpr int SUPER_K = 16 * (32 / W);
  const auto kernel = gemv_cuda_kernel<T, W, N_TILES, WARPS, U>;
  const int M = x.size(0), K = x.size(1), N = qweight.size(0);
  const int row_blocks = (N + 16 * WARPS - 1) / (16 * WARPS);
  const int steps = K / SUPER_K;
  // Split K so that the grid fills whole waves of resident blocks: a second
  // wave that is mostly empty costs as much as a full one.
  static const int slots = [&] {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, WARPS * 32, 0));
    return std::max(1, per_sm) * sm_count();
  }();
  // Splitting costs a second launch, so it is only for grids that leave most
  // of the GPU idle.
  int splits = 1;
  double best = -1.0;
  const int max_splits = row_blocks * 2 < slots ? std::max(1, steps / (2 * U)) : 1;
  for (int sp = 1; sp <= max_splits; ++sp) {
    const int per = (steps + sp - 1) / sp;
    const int real = (steps + per - 1) / per;
    const long total = (long)row_blocks * real;
    const long waves = (total + slots - 1) / slots;
    // Busy fraction of the waves, and no credit for leaving SMs idle.
    const double score = (double)total / (waves * slots) - (total < slots ? 1.0 : 0.0);
    if (score > best + 1e-9) {
      best = score;
      splits = real;
    }
  }
  const int per_split = (steps + splits - 1) / splits;
  const T* bias_ptr = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
  at::Tensor ws;
  if (splits > 1) ws = at::empty({splits, M, N}, x.options().dtype(at::kFloat));
  auto stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(row_blocks, splits), WARPS * 32, 0, stream>>>(
      reinterpret_cast<const T*>(x.data_ptr()),
      reinterpret_cast<const uint32_t*>(qweight.data_ptr()),
      reinterpret_cast<const T*>(scales.data_ptr()), reinterpret_cast<const T*>(zeros.data_ptr()),
      bias_ptr, reinterpret_cast<T*>(y.data_ptr()),
      splits > 1 ? ws.data_ptr<float>() : nullptr, M, N, K, static_cast<int>(group_size),
      per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    const int64_t total = (int64_t)M * N;
    const int blocks = (int)std::min<int64_t>((total + 255) / 256, 4096);
    finish_split_kernel<T><<<blocks, 256, 0, stream>>>(ws.data_ptr<float>(), bias_ptr,
                                                        reinterpret_cast<T*>(y.data_ptr()),
                                                        total, N, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, int W>
void dispatch_tiles(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, const std::optional<at::Tensor>& bias,
                    at::Tensor& y, int64_t group_size) {
  const int64_t M = x.size(0);
  if (M <= 8) return launch<T, W, 1>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 16) return launch<T, W, 2>(x, qweight, scales, zeros, bias, y, group_size);
  if (M <= 32 || W == 2) return launch<T, W, 4>(x, qweight, scales, zeros, bias, y, group_size);
  // 2-bit codes with 8 tiles would spill registers; gemv_supported sends them elsewhere.
  if constexpr (W != 2) return launch<T, W, 8>(x, qweight, scales, zeros, bias, y, group_size);
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
         x.size(0) <= (w_bit == 2 ? kGemvMaxRows / 2 : kGemvMaxRows) && K % super_k == 0 &&
         aligned(x) && aligned(qweight);
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
