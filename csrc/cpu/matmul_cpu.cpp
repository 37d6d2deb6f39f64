// mpq::matmul on the CPU.
//
// Two paths, both accumulating in float32:
//  - few rows (decode): each thread dequantizes one weight row at a time into
//    an L1-sized buffer and dots it with every input row, so the packed
//    weights are read once and no [N, K] temporary is made;
//  - many rows: dequantize to a float32 [N, K] temporary and hand the product
//    to at::mm (BLAS), whose blocking beats anything hand-written here.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../mpq.h"
#include "unpack.h"

namespace mpq::cpu {

namespace {

constexpr int64_t kFusedMaxRows = 4;

// 16 independent partial sums let the compiler vectorize the reduction
// without reassociation flags.
inline float dot(const float* a, const float* b, int64_t K) {
  float acc[16] = {0.f};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[k + j] * b[k + j];
  }
  float s = 0.f;
  for (; k < K; ++k) s += a[k] * b[k];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

template <typename scale_t>
void fused_rows(const at::Tensor& xf, const at::Tensor& q, const at::Tensor& s,
                const at::Tensor& z, int64_t w_bit, int64_t group_size, at::Tensor& yf) {
  const int64_t M = xf.size(0), K = xf.size(1), N = q.size(0);
  const float* xp = xf.data_ptr<float>();
  float* yp = yf.data_ptr<float>();
  const int32_t* qp = q.data_ptr<int32_t>();
  const scale_t* sp = s.data_ptr<scale_t>();
  const scale_t* zp = z.data_ptr<scale_t>();
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(K);
    for (int64_t n = n0; n < n1; ++n) {
      dequantize_rows<scale_t, float>(qp, sp, zp, n, n + 1, K, w_bit, group_size, row.data());
      for (int64_t m = 0; m < M; ++m) yp[m * N + n] = dot(row.data(), xp + m * K, K);
    }
  });
}

}  // namespace

at::Tensor matmul_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t w_bit, int64_t group_size,
                      const std::optional<at::Tensor>& perm,
                      const std::optional<at::Tensor>& bias) {
  const auto shape = check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias);
  const int64_t K = shape.K, N = shape.N;
  auto [x2, out_sizes] = as_rows(x, K, N);
  const int64_t M = x2.size(0);
  if (M == 0 || N == 0) return at::zeros(out_sizes, x.options());
  if (K == 0) {
    auto y = at::zeros({M, N}, x.options());
    if (bias.has_value()) y.add_(*bias);
    return as_output(y, out_sizes);
  }
  if (perm.has_value()) x2 = x2.index_select(1, checked_perm(*perm, K));
  auto xf = x2.to(at::kFloat).contiguous();
  const auto q = qweight.contiguous();
  const auto s = scales.contiguous();
  const auto z = zeros.contiguous();
  at::Tensor yf;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "matmul_cpu", [&] {
    if (M <= kFusedMaxRows) {
      yf = at::empty({M, N}, xf.options());
      fused_rows<scalar_t>(xf, q, s, z, w_bit, shape.group_size, yf);
    } else {
      yf = at::mm(xf, dequantize_tensor(q, s, z, K, w_bit, shape.group_size, /*as_float=*/true).t());
    }
  });
  if (bias.has_value()) yf.add_(bias->to(at::kFloat));
  return as_output(yf.to(x.scalar_type()), out_sizes);
}

TORCH_LIBRARY_IMPL(mpq, CPU, m) { m.impl("matmul", &matmul_cpu); }

}  // namespace mpq::cpu
