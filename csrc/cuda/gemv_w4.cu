// The fused GEMV kernels for 4-bit codes (gemv.cuh).
#include "gemv.cuh"

namespace mpq::cuda {

MPQ_FUSED_WIDTH(gemv_w, 4);

}  // namespace mpq::cuda
