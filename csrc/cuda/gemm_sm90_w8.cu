// The wgmma kernels for 8-bit codes (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

MPQ_GEMM_SM90_WIDTH(8);

}  // namespace mpq::cuda
