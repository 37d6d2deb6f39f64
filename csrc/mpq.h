// Shared declarations for the mpq ops: argument checks and per-device kernels.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <vector>

namespace mpq {

// Numbers and shapes go into error messages as text made here. Streaming an
// integer inside c10::str would instantiate libstdc++'s number formatting in
// this library, and that copy crashed against the runtime's (torch 2.11 CUDA
// wheels, g++ 13).
inline std::string num(int64_t v) { return std::to_string(v); }
inline std::string shape_of(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// Values that go with a validated set of matmul/dequantize arguments.
struct WeightShape {
  int64_t N;           // out_features
  int64_t K;           // in_features
  int64_t group_size;  // resolved: -1 becomes K
  int64_t groups;      // K / group_size
};

// Checks qweight/scales/zeros/w_bit/group_size against K and the expected
// float dtype. Every message names the argument, what was expected and what
// came; the Python fakes in mpq_ops/ops.py make the same checks.
WeightShape check_weight(const char* op, const at::Tensor& qweight,
                         const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t w_bit, int64_t group_size, int64_t K);

// x viewed as rows [M, K] and the output's sizes [..., N], shared by the
// devices' matmul entry points.
struct Rows {
  at::Tensor x2;
  std::vector<int64_t> out_sizes;
};
inline Rows as_rows(const at::Tensor& x, int64_t K, int64_t N) {
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  // A 2-D x is already its rows: no reshape, which would make a view (and its
  // autograd metadata) on every call.
  return {x.dim() == 2 ? x : x.reshape({-1, K}), std::move(out_sizes)};
}
// The [M, N] result in the output's sizes (a view only where they differ).
inline at::Tensor as_output(const at::Tensor& y, const std::vector<int64_t>& out_sizes) {
  return y.sizes() == at::IntArrayRef(out_sizes) ? y : y.view(out_sizes);
}

// Checks x, perm and bias for mpq::matmul and returns the weight shape.
WeightShape check_matmul(const at::Tensor& x, const at::Tensor& qweight,
                         const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t w_bit, int64_t group_size,
                         const std::optional<at::Tensor>& perm,
                         const std::optional<at::Tensor>& bias);

// perm as int64 after checking its values lie in [0, K) (reads them on the
// host: CPU kernels only).
at::Tensor checked_perm(const at::Tensor& perm, int64_t K);

// The error for perm values outside [0, K), given their least and greatest.
void check_perm_range(int64_t lo, int64_t hi, int64_t K);

// K implied by a qweight of shape [N, K*w_bit/32], after w_bit is checked.
int64_t infer_k(const char* op, const at::Tensor& qweight, int64_t w_bit);

}  // namespace mpq
