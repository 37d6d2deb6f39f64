// CUDA registrations of the mpq ops. Up to 128 rows of x go to the fused
// kernel with x staged in shared memory (gemm.cuh) unless the wgmma kernel
// takes them (Hopper: 4-bit codes, 17 to 4096 rows, from 9 for wide weights;
// 8-bit codes, 9 to 4096 rows, from 5 for large weights; 2-bit codes, 17 to
// 4096 rows: gemm_sm90.cuh); the rest are dequantized to a temporary from
// PyTorch's caching allocator and multiplied by cuBLAS. (The register-fed
// GEMV, gemv.cuh, serves when forced.) No host syncs, current stream
// throughout, so the ops capture into CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../mpq.h"
#include "kernels.h"

namespace mpq::cuda {

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t w_bit, int64_t group_size);

at::Tensor matmul_cuda(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const at::Tensor& zeros, int64_t w_bit, int64_t group_size,
                       const std::optional<at::Tensor>& perm,
                       const std::optional<at::Tensor>& bias) {
  const auto shape = check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const int64_t K = shape.K, N = shape.N;
  auto [x2, out_sizes] = as_rows(x, K, N);
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::zeros(out_sizes, x.options());
  // No inputs (K = 0): y is the bias, or zeros, as on the CPU; no kernel
  // needs to handle a K without a single step.
  if (K == 0) {
    auto y = at::zeros(out_sizes, x.options());
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  // perm values are not range-checked here: that would need a host sync.
  // index_select raises a device-side error for an out-of-range index.
  if (perm.has_value()) x2 = x2.index_select(1, *perm);
  x2 = x2.contiguous();
  const auto q = qweight.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros.contiguous();
  const auto kernel = choose_kernel(x2, q, s, z, w_bit, shape.group_size);
  if (kernel != MatmulKernel::Dequantize) {
    auto y = at::empty({M, N}, x.options());
    if (kernel == MatmulKernel::Gemv) {
      gemv_cuda(x2, q, s, z, bias, y, w_bit, shape.group_size);
    } else if (kernel == MatmulKernel::Sm90) {
      gemm_sm90_cuda(x2, q, s, z, bias, y, w_bit, shape.group_size);
    } else {
      gemm_cuda(x2, q, s, z, bias, y, w_bit, shape.group_size);
    }
    return as_output(y, out_sizes);
  }
  auto W = at::empty({N, K}, scales.options());
  dequantize_into(q, s, z, w_bit, shape.group_size, W);
  auto y = bias.has_value() ? at::addmm(*bias, x2, W.t()) : at::mm(x2, W.t());
  return as_output(y, out_sizes);
}

TORCH_LIBRARY_IMPL(mpq, CUDA, m) {
  m.impl("matmul", &matmul_cuda);
  m.impl("dequantize", &dequantize_cuda);
}

}  // namespace mpq::cuda
