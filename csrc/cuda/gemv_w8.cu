// The fused GEMV kernels for 8-bit codes (gemv.cuh).
#include "gemv.cuh"

namespace mpq::cuda {

MPQ_GEMV_WIDTH(8);

}  // namespace mpq::cuda
