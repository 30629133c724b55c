// Kernel launch and dynamic shared memory: the two CUDA constructs outside plain C++ that the
// kernels use besides PTX (ptx.cuh). With PEARLMOE_EMULATE they map onto the CPU emulator of the
// test suite (tests/emu/), so every kernel body and launcher compiles unchanged for both.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#if defined(PEARLMOE_EMULATE)
#include <emu/launch.h>
// The block's dynamic shared memory, as a T* named `name`.
#define PM_DYNAMIC_SMEM(T, name) T* const name = reinterpret_cast<T*>(::emu::dynamic_smem())
#else
#define PM_DYNAMIC_SMEM(T, name) extern __shared__ __align__(128) T name[]
#endif

namespace pearlmoe {

// kernel<<<grid, block, smem_bytes, stream>>>(args...), returning the launch error.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem_bytes,
                          cudaStream_t stream, Args&&... args) {
#if defined(PEARLMOE_EMULATE)
  return ::emu::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
#else
  // clang-format would split the >>> of a launch in a header.
  // clang-format off
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  return cudaGetLastError();
#endif
}

}  // namespace pearlmoe
