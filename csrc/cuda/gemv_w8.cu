// The fused GEMV kernels for 8-bit codes (gemv.cuh).
#include "gemv.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemv_w, 8);

}  // namespace mpq::cuda
