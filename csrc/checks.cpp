// Argument validation shared by every device's kernels, so that CPU and CUDA
// reject the same inputs with the same words.
#include "mpq.h"

#include <c10/util/Exception.h>

namespace mpq {

static void check_w_bit(const char* op, int64_t w_bit) {
  TORCH_CHECK_VALUE(w_bit == 2 || w_bit == 4 || w_bit == 8, op,
                    ": w_bit must be 2, 4 or 8, got ", num(w_bit).c_str());
}

int64_t infer_k(const char* op, const at::Tensor& qweight, int64_t w_bit) {
  check_w_bit(op, w_bit);
  TORCH_CHECK(qweight.dim() == 2, op,
              ": qweight must be 2-D [N, K*w_bit/32], got ", num(qweight.dim()).c_str(),
              "-D tensor of shape ", shape_of(qweight).c_str());
  return qweight.size(1) * (32 / w_bit);
}

WeightShape check_weight(const char* op, const at::Tensor& qweight,
                         const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t w_bit, int64_t group_size, int64_t K) {
  check_w_bit(op, w_bit);
  TORCH_CHECK(qweight.scalar_type() == at::kInt, op,
              ": qweight must be int32, got ", qweight.scalar_type());
  TORCH_CHECK(qweight.dim() == 2, op,
              ": qweight must be 2-D [N, K*w_bit/32], got ", num(qweight.dim()).c_str(),
              "-D tensor of shape ", shape_of(qweight).c_str());
  TORCH_CHECK(K % 32 == 0, op,
              ": in_features K must be a multiple of 32, got K=", num(K).c_str());
  const int64_t N = qweight.size(0);
  const int64_t words = K * w_bit / 32;
  TORCH_CHECK(qweight.size(1) == words, op, ": qweight must have shape [N, ",
              num(words).c_str(), "] for K=", num(K).c_str(), " and w_bit=",
              num(w_bit).c_str(), ", got ", shape_of(qweight).c_str());
  TORCH_CHECK_VALUE(group_size == -1 || (group_size > 0 && group_size % 32 == 0),
                    op, ": group_size must be -1 or a positive multiple of 32, got ",
                    num(group_size).c_str());
  const int64_t gs = group_size == -1 ? K : group_size;
  TORCH_CHECK_VALUE(K == 0 || K % gs == 0, op, ": group_size ", num(group_size).c_str(),
                    " must divide in_features K=", num(K).c_str());
  const int64_t groups = gs == 0 ? 0 : K / gs;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scales", scales},
                                std::pair<const char*, const at::Tensor&>{"zeros", zeros}}) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == groups, op, ": ",
                name, " must have shape [N, K/group_size] = [", num(N).c_str(), ", ",
                num(groups).c_str(), "], got ", shape_of(t).c_str());
    TORCH_CHECK(t.device() == qweight.device(), op, ": ", name,
                " must be on the same device as qweight (", qweight.device(),
                "), got ", t.device());
  }
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kBFloat16 ||
                  scales.scalar_type() == at::kFloat,
              op, ": scales must be float16, bfloat16 or float32, got ",
              scales.scalar_type());
  TORCH_CHECK(zeros.scalar_type() == scales.scalar_type(), op,
              ": zeros must have the dtype of scales (", scales.scalar_type(),
              "), got ", zeros.scalar_type());
  return {N, K, gs, groups};
}

WeightShape check_matmul(const at::Tensor& x, const at::Tensor& qweight,
                         const at::Tensor& scales, const at::Tensor& zeros,
                         int64_t w_bit, int64_t group_size,
                         const std::optional<at::Tensor>& perm,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "mpq::matmul";
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension [..., K], got a scalar");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kFloat,
              op, ": x must be float16, bfloat16 or float32, got ", x.scalar_type());
  TORCH_CHECK(qweight.device() == x.device(), op,
              ": qweight must be on the same device as x (", x.device(), "), got ",
              qweight.device());
  TORCH_CHECK(scales.scalar_type() == x.scalar_type(), op,
              ": scales must have the dtype of x (", x.scalar_type(), "), got ",
              scales.scalar_type());
  const auto shape = check_weight(op, qweight, scales, zeros, w_bit, group_size, x.size(-1));
  if (perm.has_value()) {
    const auto& p = *perm;
    TORCH_CHECK(p.dim() == 1 && p.size(0) == shape.K, op,
                ": perm must have shape [K] = [", num(shape.K).c_str(), "], got ",
                shape_of(p).c_str());
    TORCH_CHECK(p.scalar_type() == at::kInt || p.scalar_type() == at::kLong, op,
                ": perm must be int32 or int64, got ", p.scalar_type());
    TORCH_CHECK(p.device() == x.device(), op, ": perm must be on the same device as x (",
                x.device(), "), got ", p.device());
  }
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == shape.N, op,
                ": bias must have shape [N] = [", num(shape.N).c_str(), "], got ",
                shape_of(b).c_str());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op,
                ": bias must have the dtype of x (", x.scalar_type(), "), got ",
                b.scalar_type());
    TORCH_CHECK(b.device() == x.device(), op, ": bias must be on the same device as x (",
                x.device(), "), got ", b.device());
  }
  return shape;
}

at::Tensor checked_perm(const at::Tensor& perm, int64_t K) {
  // Checked here because index_select's own error does not say which
  // argument was wrong.
  const auto p = perm.to(at::kLong);
  if (p.numel() == 0) return p;
  check_perm_range(p.min().item<int64_t>(), p.max().item<int64_t>(), K);
  return p;
}

void check_perm_range(int64_t lo, int64_t hi, int64_t K) {
  TORCH_CHECK(lo >= 0 && hi < K, "mpq::matmul: perm values must lie in [0, ", num(K).c_str(),
              "), got values in [", num(lo).c_str(), ", ", num(hi).c_str(), "]");
}

}  // namespace mpq
