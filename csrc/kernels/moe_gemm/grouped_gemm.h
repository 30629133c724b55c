// Torch-free grouped GEMM kernels for the MoE expert FFN (device pointers; enqueue on `stream`;
// never synchronise; return the launch error).
//
// For every group g, the problem rows offs[g]:offs[g+1] compute
//     acc[r, :] = A[row(r), :] · B[g]^T            (fp32 accumulation)
// where row(r) = a_rows ? a_rows[r] : r (a row gather fused into the A load) and B[g] is N×K
// row-major (the checkpoint's out×in orientation). The epilogue writes
//     kNone:   C[r, n] = acc[r, n]                                  (C is [M, N])
//     kSwiGLU: C[r, i] = silu(acc[r, i]) * acc[r, I + i], I = N/2   (C is [M, N/2]; B[g] stacks
//              gate rows 0..I-1 then up rows I..2I-1)
// in A's dtype. Rows r >= offs[G] (dropped slots) are not written. Group sizes are read on the
// device, so nothing here needs the host to know them (CUDA-graph capturable).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace pearlmoe::moe_gemm {

enum class DType { kBF16, kFP16 };

// Problems with at most this many rows per group (m / num_groups; the host cannot see the real
// sizes) are decode-shaped: bound by streaming B, so they take the 16-row mma.sync tile rather
// than a 128-row tile that would be mostly padding (and rather than CUTLASS on Hopper).
constexpr int64_t kDecodeMaxRowsPerGroup = 32;
enum class Epilogue { kNone, kSwiGLU };

struct GroupedGemmParams {
  const void* a;  // [rows of A, K], row stride lda elements, unit column stride
  int64_t lda;
  const int32_t* a_rows;         // [M] or nullptr
  const void* b;                 // [G, N, K] contiguous
  const int32_t* group_offsets;  // [G + 1]: offs[0] = 0, nondecreasing, offs[G] <= M
  void* c;                       // [M, N] (kNone) or [M, N/2] (kSwiGLU), contiguous
  int64_t m;                     // problem rows (an upper bound of offs[G])
  int64_t n;                     // B rows per group; even for kSwiGLU
  int64_t k;
  int num_groups;
  DType dtype;
  Epilogue epilogue;
};

// Handwritten tensor-core kernel (mma.sync, sm_80 and newer): the sm_80 path and the fallback.
// Has a decode-shaped tile (few rows per group) so small groups are not padded to a large tile.
// Requires k % 8 == 0 and n % 8 == 0 (16-byte rows) and a, b 16-byte aligned.
cudaError_t grouped_gemm_sm80(const GroupedGemmParams& p, cudaStream_t stream);

// CUTLASS 3.x pointer-array grouped GEMM with per-group problem sizes built on the device
// (sm_90a only). Supports a_rows == nullptr and Epilogue::kNone; returns cudaErrorNotSupported
// for anything else or when this build has no sm_90a code. Needs workspace_bytes of scratch.
bool grouped_gemm_sm90_supported(const GroupedGemmParams& p);
size_t grouped_gemm_sm90_workspace_bytes(const GroupedGemmParams& p);
cudaError_t grouped_gemm_sm90(const GroupedGemmParams& p, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

}  // namespace pearlmoe::moe_gemm
