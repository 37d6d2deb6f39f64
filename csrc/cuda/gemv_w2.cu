// The fused GEMV kernels for 2-bit codes (gemv.cuh).
#include "gemv.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemv_w, 2);

}  // namespace mpq::cuda
