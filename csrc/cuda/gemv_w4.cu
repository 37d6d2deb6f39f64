// The fused GEMV kernels for 4-bit codes (gemv.cuh).
#include "gemv.cuh"

namespace mpq::cuda {

MPQ_GEMV_WIDTH(4);

}  // namespace mpq::cuda
