// The wgmma kernels for 2-bit codes (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

MPQ_GEMM_SM90_WIDTH(2);

}  // namespace mpq::cuda
