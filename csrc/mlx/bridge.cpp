// The MLX backend's CPU kernels in C++: mpq::matmul / mpq::dequantize on CPU
// tensors through mlx::core::quantized_matmul / dequantize, with no Python on
// the call path. Built into mpq_ops._mlx when MLX's headers and libmlx are
// present at build time; mpq_ops.mlx_bridge switches these kernels in for the
// CPU dispatch key (set_cpu_kernels) and keeps its Python bridge for MPS and
// for builds without this library.
//
// The canonical weight format is MLX's affine w_q layout (uint32 words, lowest
// bits first, [N, K*bits/32]) with biases = -zeros * scales, so a call is:
// copy x into an MLX array, quantized_matmul against weight arrays made once
// per weight, evaluate, and hand MLX's output buffer to torch without a copy.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/intrusive_ptr.h>
#include <mlx/mlx.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>

#include "../cpu/unpack.h"
#include "../mpq.h"

namespace mx = mlx::core;

namespace mpq_mlx {
namespace {

bool mlx_serves(int64_t w_bit, int64_t group_size) {
  return (w_bit == 2 || w_bit == 4 || w_bit == 8) &&
         (group_size == 32 || group_size == 64 || group_size == 128);
}

// A CPU tensor as an MLX array of dtype `dt` (same bytes). MLX copies the
// data into its own buffer on CPU (or aliases it where it can); either way the
// tensor is kept alive until MLX calls the deleter.
mx::array to_mlx(const at::Tensor& t, mx::Dtype dt) {
  auto c = t.contiguous();
  mx::Shape shape(c.sizes().begin(), c.sizes().end());
  auto* keep = new at::Tensor(c);
  return mx::array(c.data_ptr(), std::move(shape), dt, [keep](void*) { delete keep; });
}

// x's rows [M, K] as a float32 MLX array (MLX's CPU kernels accumulate in the
// input dtype, so they get float32). MLX's CPU allocator cannot adopt foreign
// memory (the raw-pointer constructor above copies), so where MLX lets us own
// a buffer of its allocator, x is converted straight into it: one pass over x
// whatever its dtype, no torch temporary.
mx::array rows_to_mlx(const at::Tensor& x2) {
#if defined(MLX_VERSION_NUMERIC) && MLX_VERSION_NUMERIC >= 32000
  const int64_t M = x2.size(0), K = x2.size(1);
  mx::array a(mx::allocator::malloc(static_cast<size_t>(M * K) * sizeof(float)),
              mx::Shape{static_cast<int>(M), static_cast<int>(K)}, mx::float32);
  if (x2.scalar_type() == at::kFloat && x2.is_contiguous()) {
    std::memcpy(a.data<float>(), x2.data_ptr<float>(), static_cast<size_t>(M * K) * sizeof(float));
  } else {
    at::from_blob(a.data<float>(), {M, K}, at::TensorOptions().dtype(at::kFloat)).copy_(x2);
  }
  return a;
#else
  return to_mlx(x2.to(at::kFloat), mx::float32);
#endif
}

// An evaluated float32 MLX array as a torch tensor sharing its buffer: the
// tensor's deleter holds the array, so MLX frees the memory when torch is done.
at::Tensor to_torch(const mx::array& a) {
  TORCH_CHECK(a.dtype() == mx::float32 && a.flags().row_contiguous,
              "mpq_mlx: MLX returned a non-contiguous or non-float32 array");
  std::vector<int64_t> sizes(a.shape().begin(), a.shape().end());
  auto* keep = new mx::array(a);
  return at::from_blob(keep->data<float>(), sizes, [keep](void*) { delete keep; },
                       at::TensorOptions().dtype(at::kFloat));
}

// --- weight cache -------------------------------------------------------------
// MLX arrays (w_q, float32 scales, biases) per weight, keyed by qweight's
// TensorImpl. Every tensor is held weakly; an entry is valid while all three
// tensors are the same objects at the same versions and data pointers (so an
// in-place update or a swapped parameter is seen). Entries whose qweight died
// are dropped at the next call (sweep), so the MLX copies go with the weight.

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Seen {
  WeakImpl impl;
  uint32_t version;
  const void* data;
  explicit Seen(const at::Tensor& t)
      : impl(t.getIntrusivePtr()), version(t._version()), data(t.data_ptr()) {}
  bool same(const at::Tensor& t) const {
    return impl._unsafe_get_target() == t.unsafeGetTensorImpl() && !impl.expired() &&
           version == t._version() && data == t.data_ptr();
  }
};

struct WeightArrays {
  Seen q, s, z;
  mx::array w_q, scales, biases;
};

std::mutex cache_mutex;
std::unordered_map<const c10::TensorImpl*, std::unique_ptr<WeightArrays>> cache;

void sweep_locked() {
  for (auto it = cache.begin(); it != cache.end();) {
    it = it->second->q.impl.expired() ? cache.erase(it) : std::next(it);
  }
}

// The entry for this weight, made (or remade) when missing or stale. The
// returned arrays are copies of the cached handles (cheap, shared buffers).
std::tuple<mx::array, mx::array, mx::array> weight_arrays(const at::Tensor& qweight,
                                                          const at::Tensor& scales,
                                                          const at::Tensor& zeros) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  sweep_locked();
  auto it = cache.find(qweight.unsafeGetTensorImpl());
  if (it != cache.end()) {
    const auto& e = *it->second;
    if (e.q.same(qweight) && e.s.same(scales) && e.z.same(zeros)) {
      return {e.w_q, e.scales, e.biases};
    }
    cache.erase(it);
  }
  const auto s = scales.to(at::kFloat);
  auto w_q = to_mlx(qweight, mx::uint32);
  auto sa = to_mlx(s, mx::float32);
  auto ba = to_mlx(-(zeros.to(at::kFloat) * s), mx::float32);
  mx::eval(w_q, sa, ba);
  auto entry = std::unique_ptr<WeightArrays>(
      new WeightArrays{Seen(qweight), Seen(scales), Seen(zeros), w_q, sa, ba});
  cache.emplace(qweight.unsafeGetTensorImpl(), std::move(entry));
  return {w_q, sa, ba};
}

int64_t cached_weights() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  sweep_locked();
  return static_cast<int64_t>(cache.size());
}

// --- kernels ----------------------------------------------------------------------

at::Tensor matmul_mlx_cpu(const at::Tensor& x, const at::Tensor& qweight,
                          const at::Tensor& scales, const at::Tensor& zeros, int64_t w_bit,
                          int64_t group_size, const std::optional<at::Tensor>& perm,
                          const std::optional<at::Tensor>& bias) {
  const auto shape = mpq::check_matmul(x, qweight, scales, zeros, w_bit, group_size, perm, bias);
  const int64_t N = shape.N, K = shape.K;
  auto [x2, out_sizes] = mpq::as_rows(x, K, N);
  if (x2.numel() == 0 || N == 0) return at::zeros(out_sizes, x.options());
  if (perm.has_value()) x2 = x2.index_select(1, mpq::checked_perm(*perm, K));
  at::Tensor y;
  if (mlx_serves(w_bit, shape.group_size)) {
    auto [w_q, s, b] = weight_arrays(qweight, scales, zeros);
    auto ya = mx::quantized_matmul(rows_to_mlx(x2), w_q, s, b, /*transpose=*/true,
                                   static_cast<int>(shape.group_size), static_cast<int>(w_bit),
                                   "affine");
    mx::eval(ya);
    y = to_torch(ya);
  } else {
    // What MLX lacks (group sizes other than 32/64/128): the native unpacking.
    const auto W = mpq::cpu::dequantize_tensor(qweight.contiguous(), scales.contiguous(),
                                               zeros.contiguous(), K, w_bit, shape.group_size,
                                               /*as_float=*/true);
    y = at::mm(x2.to(at::kFloat), W.t());
  }
  if (bias.has_value()) y = y + bias->to(at::kFloat);
  return mpq::as_output(y.to(x.scalar_type()), out_sizes);
}

at::Tensor dequantize_mlx_cpu(const at::Tensor& qweight, const at::Tensor& scales,
                              const at::Tensor& zeros, int64_t w_bit, int64_t group_size) {
  const int64_t K = mpq::infer_k("mpq::dequantize", qweight, w_bit);
  const auto shape = mpq::check_weight("mpq::dequantize", qweight, scales, zeros, w_bit,
                                       group_size, K);
  if (!mlx_serves(w_bit, shape.group_size) || qweight.numel() == 0) {
    return mpq::cpu::dequantize_tensor(qweight.contiguous(), scales.contiguous(),
                                       zeros.contiguous(), K, w_bit, shape.group_size,
                                       /*as_float=*/false);
  }
  auto [w_q, s, b] = weight_arrays(qweight, scales, zeros);
  auto W = mx::dequantize(w_q, s, b, static_cast<int>(shape.group_size), static_cast<int>(w_bit),
                          "affine");
  mx::eval(W);
  return to_torch(W).to(scales.scalar_type());
}

// The mpq CPU kernels replaced by these while the library is alive. Never
// freed at exit: the dispatcher may already be gone by then.
torch::Library* cpu_kernels = nullptr;

// Swallows the dispatcher's "overriding a previously registered kernel"
// warning: replacing the native CPU kernels is the point of the switch.
struct QuietWarnings : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

void set_cpu_kernels(bool enable) {
  QuietWarnings quiet;
  c10::WarningUtils::WarningHandlerGuard guard(&quiet);
  if (enable && cpu_kernels == nullptr) {
    cpu_kernels = new torch::Library(torch::Library::IMPL, "mpq", c10::DispatchKey::CPU,
                                     __FILE__, __LINE__);
    cpu_kernels->impl("matmul", TORCH_FN(matmul_mlx_cpu));
    cpu_kernels->impl("dequantize", TORCH_FN(dequantize_mlx_cpu));
  } else if (!enable && cpu_kernels != nullptr) {
    delete cpu_kernels;  // deregisters: the native C++ kernels serve CPU again
    cpu_kernels = nullptr;
  }
}

bool cpu_kernels_on() { return cpu_kernels != nullptr; }

}  // namespace
}  // namespace mpq_mlx

TORCH_LIBRARY(mpq_mlx, m) {
  // The same functions as mpq::matmul / mpq::dequantize, always through MLX
  // on CPU tensors (for benchmarks and tests), and the backend switch.
  m.def("matmul(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int w_bit, "
        "int group_size, Tensor? perm=None, Tensor? bias=None) -> Tensor");
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor zeros, int w_bit, "
        "int group_size) -> Tensor");
  m.def("set_cpu_kernels(bool enable) -> ()", &mpq_mlx::set_cpu_kernels);
  m.def("cpu_kernels_on() -> bool", &mpq_mlx::cpu_kernels_on);
  m.def("cached_weights() -> int", &mpq_mlx::cached_weights);
}

TORCH_LIBRARY_IMPL(mpq_mlx, CPU, m) {
  m.impl("matmul", TORCH_FN(mpq_mlx::matmul_mlx_cpu));
  m.impl("dequantize", TORCH_FN(mpq_mlx::dequantize_mlx_cpu));
}

// `import mpq_ops._mlx` loads this library (after mlx.core, which loads libmlx).
extern "C" PyObject* PyInit__mlx(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_mlx", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
