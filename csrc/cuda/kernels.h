// CUDA kernels of the mpq ops (host-side entry points).
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace mpq::cuda {

// Rows of x up to which the fused tensor-core GEMV beats dequantize + cuBLAS
// (half of it for 2-bit weights, whose widest tile would spill registers).
constexpr int64_t kGemvMaxRows = 64;

// x [M, K] contiguous fp16/bf16, M <= kGemvMaxRows, K a multiple of the
// kernel's step, 16-byte aligned x and qweight.
bool gemv_supported(const at::Tensor& x, const at::Tensor& qweight, int64_t w_bit);

// y [M, N] = x @ W^T (+ bias); group_size resolved (K for one group per row).
void gemv_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& zeros, const std::optional<at::Tensor>& bias, at::Tensor& y,
               int64_t w_bit, int64_t group_size);

// W [N, K] in scales' dtype; group_size resolved.
void dequantize_into(const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t w_bit, int64_t group_size, at::Tensor& out);

}  // namespace mpq::cuda
