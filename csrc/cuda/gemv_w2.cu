// The fused GEMV kernels for 2-bit codes (gemv.cuh).
#include "gemv.cuh"

namespace mpq::cuda {

MPQ_GEMV_WIDTH(2);

}  // namespace mpq::cuda
