// Torch-free elementwise CUDA kernels around the expert GEMMs (device pointers; enqueue on
// `stream`; return the launch error). `dtype` is the activations' type: bf16 or fp16.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "grouped_gemm.h"

namespace pearlmoe::moe_gemm {

// h [M, 2I] -> out [M, I]: out[r, i] = silu(h[r, i]) * h[r, I + i], in fp32 then rounded. With
// routed_rows (a device pointer, e.g. group_offsets + G) only rows below *routed_rows are done:
// the rest of h was never written.
cudaError_t silu_and_mul(const void* h, void* out, int64_t rows, int64_t inter,
                         const int32_t* routed_rows, DType dtype, cudaStream_t stream);

// Weighted combine of the routed expert outputs back to token order, plus the shared expert:
//   y[t, :] = shared[t, :] + sum_i weights[t, i] * expert_out[slot_to_row[t*k + i], :]
// over the slots whose row is < group_offsets[num_groups] (dropped slots add nothing).
// Sums in fp32 in slot order (deterministic). shared may be null.
//   expert_out [M, H], weights [T, k] f32, slot_to_row [T*k] int32, shared/y [T, H].
cudaError_t moe_combine(const void* expert_out, const float* weights, const int32_t* slot_to_row,
                        const int32_t* group_offsets, int num_groups, const void* shared, void* y,
                        int64_t tokens, int top_k, int64_t hidden, DType dtype,
                        cudaStream_t stream);

// Zero rows group_offsets[num_groups] .. m-1 of c [m, cols] (the rows of dropped slots), so a
// grouped GEMM's output is fully defined without the host knowing how many rows were routed.
cudaError_t zero_tail_rows(void* c, int64_t m, int64_t cols, const int32_t* group_offsets,
                           int num_groups, DType dtype, cudaStream_t stream);

}  // namespace pearlmoe::moe_gemm
