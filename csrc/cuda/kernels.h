// CUDA kernels of the mpq ops (host-side entry points).
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace mpq::cuda {

// The most rows of x the register-fed GEMV (gemv.cuh) takes (half of it for
// 2-bit weights, whose widest tile would spill registers). It serves only
// when forced (MPQ_OPS_CUDA_KERNEL=gemv): the staged kernel with its one-row
// and k-paired variants measured faster for every width, 8-bit codes
// included (H100, g128, M = 1: (28672, 8192) 120.4 -> 101.4 us, M = 8: 130.0
// -> 107.6).
constexpr int64_t kGemvMaxRows = 64;
// Rows of x up to which the shared-memory-staged kernel (gemm.cuh) is the
// default where the wgmma kernel does not serve; it takes any number of rows.
// Above it: dequantize + cuBLAS.
constexpr int64_t kGemmMaxRows = 128;
// Where the wgmma kernel serves (Hopper, 4-bit) it takes over above 16 rows
// (its 32-row tiles of x, gemm_sm90.cuh). H200, w4 g128, staged /
// wgmma at M = 17 (us): (8192, 28672) 86.9 / 70.0, (28672, 8192) 81.1 /
// 70.0, (4096, 14336) 29.7 / 24.7, (14336, 4096) 27.6 / 25.9, (4096, 4096)
// 15.3 / 15.2. From 9 rows (its 16-row tiles) where its weight tiles cover
// 3/4 of the SMs unsplit: M = 16 at (8192, 28672) 70.1 / 66.2, (4096, 14336)
// 25.5 / 24.1; with fewer tiles the staged kernel stays ahead: (28672, 8192)
// 63.6 / 67.9, (14336, 4096) 24.1 / 25.2, (4096, 4096) 14.2 / 14.5. Up to 8
// rows (one x tile of the staged kernel) it was ahead on every shape, e.g.
// M = 8 at (8192, 28672) 62.8 / 65.4, (4096, 14336) 21.2 / 23.5.
// Up to 4096 rows, where it ran faster than dequantize + cuBLAS on the
// benchmark shapes (H100: M = 512 at (4096, 4096): 34.4 against 46.9 us;
// M = 1024 at (4096, 14336): 209.1 against 228.3, at (8192, 28672) 733.6
// against 937.3; two alternating runs, wgmma / dequantize + cuBLAS: M = 2048
// at (4096, 4096) 98.8 / 113.6, at (8192, 28672) 1470 / 1758, at (28672,
// 8192) 1469 / 1652; M = 4096 at (4096, 4096) 208 / 220, at (28672, 8192)
// 2922 / 3057 and 2802 / 3048; at (4096, 14336) 785 / 753 and 802 / 816,
// even; the one cell it lost: M = 1536 at (4096, 4096), 108 / 91). Beyond,
// the weights are dequantized to a temporary and cuBLAS multiplies, where the
// wgmma kernel's lead is gone: H100, g128, medians of three alternating
// rounds, dequantize + cuBLAS / wgmma forced (us): float16 w4 M = 8192 at
// (8192, 28672) 5953 / 5675, (28672, 8192) 5764 / 5576, (4096, 14336) 1549 /
// 1506, but (4096, 4096) 418 / 431, bfloat16 (8192, 28672) 5517 / 5620, w8
// 6097 / 6258, w2 5976 / 6034; M = 16384 at (8192, 28672) 11046 / 11344,
// (28672, 8192) 11694 / 11027, (4096, 4096) 850 / 879; mixed, and at the
// power limit (scripts/results/ab_h100_m_past_4096.log).
// Row by row from 1 to 16 (H200, float16 w4 g128, one round, us;
// scripts/results/ab_h200_m_sweep_paths.log) the policy took the faster of
// the two in every cell. The wgmma kernel's time hardly moves with M (61.5 -
// 64.5 at both large shapes, M = 1 included: the weights' side of a step sets
// it), nor does the staged 16-row kernel's from 9 rows to 16 ((28672, 8192)
// 57.9 - 58.5; (8192, 28672) 66.3 - 67.1): more rows of x cost those kernels
// next to nothing. The steps up come with the kernels: k-paired rows up to 4
// (49.0 - 49.6 at (8192, 28672)), one 8-row tile at 5 to 8 (59.8 at M = 8).
constexpr int64_t kGemmMaxRowsSm90 = 16;
constexpr int64_t kGemmMaxRowsSm90Wide = 8;  // where its tiles cover 3/4 of the SMs
// ... and the memory is that fast (GB/s, tile::peak_dram_gbps): on the H200
// (4.8 TB/s) the wgmma kernel was ahead there (above), on the H100 (3352) the
// staged kernel, in stream-K where its grid is unsplit (gemm.cuh's
// launch_kernel). H100, g128, medians of three alternating rounds, staged /
// wgmma (us): float16 w4 (8192, 28672) M = 16 67.8 / 71.1, M = 9 67.1 /
// 70.2, g64 69.4 / 75.4; bfloat16 66.9 / 72.6; (4096, 14336) 24.6 / 24.6
// (scripts/results/ab_h100_stream_k16.log).
constexpr int kSm90WideMinGbps = 4000;
// 8-bit codes: the wgmma kernel from 9 rows, and from 5 for weights of 2^27
// codes or more, against the staged kernel up to 128 rows (whose 8-row tiles
// serve 5 to 8) and dequantize + cuBLAS above. H200, w8 g128, medians of two
// or three alternating rounds, staged or dequantize + cuBLAS / wgmma (us;
// scripts/results/ab_h200_sm90_w8.log): float16 (8192, 28672) M = 4 74.0 /
// 78.0, M = 5 90.7 / 77.4, M = 8 89.8 / 77.9, M = 16 101.1 / 80.8, M = 32
// 145.2 / 82.2, M = 64 161.2 / 108.0, M = 128 319.2 / 140.8, M = 256 379.3 /
// 219.7, M = 1024 904.0 / 782.1, M = 2048 1611.2 / 1556.4; (28672, 8192) M =
// 8 86.4 / 76.3, M = 16 90.0 / 77.0; (4096, 14336) M = 5 26.2 / 27.5, M = 8
// 26.3 / 27.6, M = 9 30.4 / 27.8, M = 256 96.6 / 51.5, M = 1024 238.7 /
// 202.2; (4096, 4096) M = 5 12.9 / 14.6, M = 8 13.4 / 14.6, M = 4096 224.4 /
// 222.8; g32 M = 16 112.7 / 88.1, per row 87.1 / 75.9; bfloat16 (8192,
// 28672) M = 5 97.9 / 80.4, M = 16 112.7 / 84.2, M = 64 170.5 / 110.7, M =
// 1024 870.1 / 802.8. From 9 rows, weights of 32 or 64 tiles with a short K
// lose up to 4%, too little to carry a rule for: float16 M = 16 at (14336,
// 4096) 29.5 / 30.7, (4096, 4096) 14.7 / 15.0, (2048, 8192) 14.8 / 15.2,
// against (8192, 4096) 21.9 / 21.2 and bfloat16 (14336, 4096) 32.0 / 30.6.
// One row of x stays on the staged kernel: H100, float16 w8 g128, M = 1,
// medians of three alternating rounds, the policy / the wgmma kernel / the
// GEMV forced (us): (28672, 8192) 99.4 / 101.6 / 117.8, (8192, 28672) 96.8 /
// 103.9 / 104.1; bfloat16 (28672, 8192) 99.1 / 103.2 / 109.8
// (scripts/results/ab_h100_w8_m1_paths.log).
constexpr int64_t kGemmMaxRowsSm90W8 = 8;
constexpr int64_t kGemmMaxRowsSm90W8Large = 4;
constexpr int64_t kSm90W8LargeCodes = int64_t{1} << 27;
// 2-bit codes: the wgmma kernel from 17 rows. H200, w2 g128, medians of two
// alternating rounds, staged or dequantize + cuBLAS / wgmma (us;
// scripts/results/ab_h200_sm90_w2.log): float16 (8192, 28672) M = 16 59.6 /
// 59.2, M = 32 80.7 / 67.1, M = 64 153.5 / 80.8, M = 256 332.7 / 190.6;
// (4096, 14336) M = 16 21.5 / 23.2, M = 256 88.0 / 49.4; bfloat16 (8192,
// 28672) M = 64 155.6 / 84.2.
constexpr int64_t kGemmMaxRowsSm90W2 = 16;
constexpr int64_t kSm90MaxRows = 4096;

enum class MatmulKernel { Gemv, Gemm, Sm90, Dequantize };

// 16-byte aligned data: the fused kernels read x and the codes 16 bytes at a time.
inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Inputs per lane and per step of the fused kernels (gemv.cuh, gemm.cuh): a
// lane reads 16 bytes of a row's codes per step, four lanes a row
// (tile::WeightRows' LANE_K and SUPER_K).
constexpr int64_t lane_inputs(int64_t w_bit) { return 4 * (32 / w_bit); }
constexpr int64_t step_inputs(int64_t w_bit) { return 4 * lane_inputs(w_bit); }

// x [M, K] contiguous fp16/bf16, K a multiple of a lane's 16 bytes of codes,
// 16-byte aligned x and qweight: what the fused kernels need (the GEMV and the
// staged kernel's k ranges also a whole number of steps, which choose_kernel
// and gemm.cuh's launch check; the staged kernel takes a partial last step).
bool fused_supported(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit);

// The path for x (fused_supported decides whether a fused one may serve it).
MatmulKernel choose_kernel(const at::Tensor& x, const at::Tensor& qweight,
                           const at::Tensor& scales, const at::Tensor& zeros, int64_t w_bit,
                           int64_t group_size);

// y [M, N] = x @ W^T (+ bias); group_size resolved (K for one group per row).
void gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size);
void gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size);

// The wgmma kernel for many rows (gemm_sm90.cuh): 2-, 4- and 8-bit codes, K a
// multiple of 128, groups of 32, 64 or a multiple of 128 (group_size
// resolved), on a compute capability 9.0 device of a build with the sm_90a pass.
bool sm90_supported(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, int64_t w_bit, int64_t group_size);
// Whether M rows of x against an [N, K] weight of w_bit-bit codes go to the
// wgmma kernel where it is supported (kGemmMaxRowsSm90, kGemmMaxRowsSm90Wide,
// kGemmMaxRowsSm90W8, kGemmMaxRowsSm90W8Large, kGemmMaxRowsSm90W2; up to
// kSm90MaxRows).
bool sm90_preferred(int64_t M, int64_t N, int64_t K, int64_t w_bit);
void gemm_sm90_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
                    int64_t w_bit, int64_t group_size);

// W [N, K] in scales' dtype; group_size resolved.
void dequantize_into(const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t w_bit, int64_t group_size, at::Tensor& out);

}  // namespace mpq::cuda
