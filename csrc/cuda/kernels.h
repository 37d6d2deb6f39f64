// CUDA kernels of the mpq ops (host-side entry points).
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace mpq::cuda {

// Rows of x up to which the register-fed GEMV (gemv.cuh) is the default for
// 8-bit codes (the staged kernel serves everything else), and the most it
// takes at all (half of it for 2-bit weights, whose widest tile would spill
// registers).
constexpr int64_t kGemvRows = 8;
constexpr int64_t kGemvMaxRows = 64;
// Rows of x up to which the shared-memory-staged kernel (gemm.cuh) beats
// dequantize + cuBLAS; it takes any number of rows.
constexpr int64_t kGemmMaxRows = 128;

enum class MatmulKernel { Gemv, Gemm, Dequantize };

// x [M, K] contiguous fp16/bf16, K a multiple of the fused kernels' step,
// 16-byte aligned x and qweight: what both fused kernels need.
bool fused_supported(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit);

// The path for x (fused_supported decides whether a fused one may serve it).
MatmulKernel choose_kernel(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit);

// y [M, N] = x @ W^T (+ bias); group_size resolved (K for one group per row).
void gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size);
void gemm_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size);

// W [N, K] in scales' dtype; group_size resolved.
void dequantize_into(const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t w_bit, int64_t group_size, at::Tensor& out);

}  // namespace mpq::cuda
