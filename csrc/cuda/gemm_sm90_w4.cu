// The wgmma kernels for 4-bit codes (gemm_sm90.cuh).
#include "gemm_sm90.cuh"

namespace mpq::cuda {

MPQ_GEMM_SM90_WIDTH(4);

}  // namespace mpq::cuda
