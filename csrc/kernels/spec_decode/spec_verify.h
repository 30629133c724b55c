// CUDA launcher of the speculative-decoding verification; semantics in spec_verify_cpu.h.
#pragma once

#include <cuda_runtime_api.h>

#include "spec_verify_cpu.h"

namespace pearlmoe::spec_decode {

cudaError_t spec_verify_cuda(const SpecVerifyParams& p, cudaStream_t stream);

}  // namespace pearlmoe::spec_decode
