// Fused dequantize + matmul for few rows of x, x read straight from L1/L2 (the
// default for 8-bit codes and up to 8 rows; gemm.cuh serves the rest).
//
// y[m, n] = sum_k x[m, k] * W[n, k]. Each warp owns RT tiles of 16 output
// features (rows of W); the WARPS warps of a block own consecutive row tiles and walk the
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
#pragma once

#include "kernels.h"
#include "tile.cuh"

namespace mpq::cuda {

namespace gemv_detail {

using tile::load_stream;
using tile::mma_16816;
using tile::pack_pair;

// RT: 16-row tiles of W per warp; the x fragments loaded for one tile are
// reused for the others, which cuts x traffic when x has many rows.
template <typename T, int W, int N_TILES, int RT, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32)
    gemv_cuda_kernel(const T* __restrict__ x, const uint32_t* __restrict__ qweight,
                     const T* __restrict__ scales, const T* __restrict__ zeros,
                     const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                     int M, int N, int K, tile::Groups groups, int steps_per_split) {
  using Rows = tile::WeightRows<T, W, RT>;
  using V = typename Rows::V;
  using Step = typename Rows::Step;
  constexpr int P = Rows::P, LANE_K = Rows::LANE_K, SUPER_K = Rows::SUPER_K, R = Rows::R;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = (blockIdx.x * WARPS + warp) * 16 * RT;
  if (tile >= N) return;  // no block-wide barrier below
  const Rows rows(qweight, scales, zeros, tile, g, t, N, K, groups);

  float acc[N_TILES][RT][4];
#pragma unroll
  for (int i = 0; i < N_TILES; ++i)
#pragma unroll
    for (int rt = 0; rt < RT; ++rt) acc[i][rt][0] = acc[i][rt][1] = acc[i][rt][2] = acc[i][rt][3] = 0.f;

  const int s_begin = blockIdx.y * steps_per_split;
  const int s_end = min(K / SUPER_K, s_begin + steps_per_split);
  const auto load_step = [&](int s, Step& st) { rows.load(s, st); };
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
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int kw = k0 + j * P;
        // x[m, kw .. kw + P) for the 8 rows m of each tile that this lane feeds.
        T xs[N_TILES][P];
#pragma unroll
        for (int nt = 0; nt < N_TILES; ++nt) {
          const int m = nt * 8 + g;
          if (m < M) {
            const T* xp = x + (size_t)m * K + kw;
            if constexpr (P == 4) {
              *reinterpret_cast<uint2*>(xs[nt]) = *reinterpret_cast<const uint2*>(xp);
            } else {
#pragma unroll
              for (int qq = 0; qq < P / 8; ++qq)
                reinterpret_cast<uint4*>(xs[nt])[qq] = reinterpret_cast<const uint4*>(xp)[qq];
            }
          } else {
#pragma unroll
            for (int qq = 0; qq < P; ++qq) xs[nt][qq] = T(0.f);
          }
        }
        // Weights of this word for each of the lane's rows.
        V d[R][P / 2];
        Rows::dequant(st, j, d);
#pragma unroll
        for (int mi = 0; mi < P / 4; ++mi) {
#pragma unroll
          for (int nt = 0; nt < N_TILES; ++nt) {
            const uint32_t b0 = pack_pair<T>(xs[nt][2 * mi], xs[nt][2 * mi + P / 2]);
            const uint32_t b1 = pack_pair<T>(xs[nt][2 * mi + 1], xs[nt][2 * mi + 1 + P / 2]);
            Rows::mma(acc[nt], d, mi, b0, b1);
          }
        }
      }
    }
  }
  rows.store(acc, 0, M, N, blockIdx.y, ws, bias, y);
}

// Which kernel serves M rows of x: x tiles of 8 rows, W tiles per warp (RT)
// and steps in flight (U). Measured on the H100 (scripts/bench.py, w4 g128):
// one W tile and two steps for a single x tile; from two x tiles on, two W
// tiles per warp so that each x fragment feeds two MMAs, with the depth the
// registers allow (two steps for 4 x tiles; one for 2 and 8, and for 2-bit
// codes, where two would spill or lower occupancy). At (8192, 28672): M=16 112 -> 102 us, M=32
// 214 -> 138 us, M=64 349 -> 234 us against one W tile per warp.
inline int x_tiles(int64_t M, int w_bit) {
  return M <= 8 ? 1 : M <= 16 ? 2 : M <= 32 || w_bit == 2 ? 4 : 8;
}

template <typename T, int W, int N_TILES, int RT, int U>
void launch(const at::Tensor& x, const at::Tensor& qweight,
            const at::Tensor& scales, const at::Tensor& zeros,
            const std::optional<at::Tensor>& bias, at::Tensor& y, int64_t group_size) {
  constexpr int WARPS = 4;
  constexpr int SUPER_K = step_inputs(W);
  const auto kernel = gemv_cuda_kernel<T, W, N_TILES, RT, WARPS, U>;
  const int M = x.size(0), K = x.size(1), N = qweight.size(0);
  const int row_blocks = (N + 16 * RT * WARPS - 1) / (16 * RT * WARPS);
  const int steps = K / SUPER_K;
  // Split K so that the grid fills whole waves of resident blocks: a second
  // wave that is mostly empty costs as much as a full one.
  static tile::PerDevice slots_on;
  const int slots = slots_on.get([&] { return tile::resident_slots(kernel, WARPS * 32, 0); });
  // Splitting costs a second launch and a float32 workspace of splits x M x N,
  // so with many x rows it is only for grids that leave most of the GPU idle.
  // With one or two x tiles the workspace is small and more warps in flight
  // pay: a grid of fewer blocks than resident slots is split too (measured at
  // (8192, 28672), M=1: 75.7 -> 71.2 us; at M=64 splitting cost 234 -> 261 us).
  const bool may_split = N_TILES <= 2 ? row_blocks < slots : row_blocks * 2 < slots;
  const int max_splits = may_split ? std::max(1, steps / (2 * U)) : 1;
  const int splits = tile::wave_filling_splits(row_blocks, steps, slots, max_splits);
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
      splits > 1 ? ws.data_ptr<float>() : nullptr, M, N, K, tile::Groups::of(group_size),
      per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) tile::finish_split<T>(ws, bias_ptr, y, splits, stream);
}

template <typename T, int W, int N_TILES>
void launch_tiles(const at::Tensor& x, const at::Tensor& qweight,
                  const at::Tensor& scales, const at::Tensor& zeros,
                  const std::optional<at::Tensor>& bias, at::Tensor& y, int64_t group_size) {
  if constexpr (N_TILES == 1) {
    return launch<T, W, 1, 1, 2>(x, qweight, scales, zeros, bias, y, group_size);
  } else if constexpr (N_TILES == 4 && W != 2) {
    return launch<T, W, 4, 2, 2>(x, qweight, scales, zeros, bias, y, group_size);
  } else {
    return launch<T, W, N_TILES, 2, 1>(x, qweight, scales, zeros, bias, y, group_size);
  }
}

template <typename T, int W>
void gemv_bits(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t group_size) {
  switch (x_tiles(x.size(0), W)) {
    case 1: return launch_tiles<T, W, 1>(x, qweight, scales, zeros, bias, y, group_size);
    case 2: return launch_tiles<T, W, 2>(x, qweight, scales, zeros, bias, y, group_size);
    case 4: return launch_tiles<T, W, 4>(x, qweight, scales, zeros, bias, y, group_size);
    default:
      // 2-bit codes with 8 tiles would spill registers; choose_kernel sends them elsewhere.
      if constexpr (W != 2)
        return launch_tiles<T, W, 8>(x, qweight, scales, zeros, bias, y, group_size);
  }
}

}  // namespace gemv_detail

// The fused kernels for W-bit codes, fp16 or bf16 x. Each width is
// instantiated in its own gemv_w<W>.cu (the extern declarations keep other
// files from compiling them again), so the three build in parallel.
template <int W>
void gemv_w(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
            const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
            int64_t group_size) {
  tile::by_dtype(x, [&](auto t) {
    gemv_detail::gemv_bits<decltype(t), W>(x, qweight, scales, zeros, bias, y, group_size);
  });
}

MPQ_FUSED_WIDTHS_ELSEWHERE(gemv_w);

}  // namespace mpq::cuda
