// Stable counting sort of token-slots by expert, in three deterministic passes:
//   1. count:   one warp per chunk of kChunk slots counts its slots per bucket (shared memory);
//   2. scan:    one block turns the [chunks, buckets] counts into each chunk's first row per
//               bucket and writes expert_offsets;
//   3. scatter: one warp per chunk walks its slots in order and writes both permutations.
// Buckets are experts 0..E-1 plus a tail bucket E for dropped slots. No atomics, so the output
// is identical run to run; slots keep their order within an expert (stable).
#include <cub/block/block_scan.cuh>

#include "../launch.cuh"
#include "routing.h"
#include "routing_common.h"

namespace pearlmoe::routing {
namespace {

constexpr int kChunk = 1024;  // slots per warp in passes 1 and 3
constexpr int kScanThreads = 1024;
constexpr unsigned kFullMask = 0xffffffffu;

int64_t num_chunks(int64_t num_slots) { return (num_slots + kChunk - 1) / kChunk; }

// Pass 1: counts[chunk][b] = slots of this chunk in bucket b.
template <typename IdT>
__global__ void count_kernel(const IdT* __restrict__ ids, int64_t num_slots, int num_experts,
                             int32_t* __restrict__ counts) {
  PM_DYNAMIC_SMEM(int32_t, bucket_count);  // [E+1]
  const int num_buckets = num_experts + 1;
  const int lane = threadIdx.x;
  for (int b = lane; b < num_buckets; b += 32) bucket_count[b] = 0;
  __syncwarp();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int step = 0; step < kChunk; step += 32) {
    const int64_t s = begin + step + lane;
    const bool valid = s < num_slots;
    // Invalid lanes use key -1, which no real bucket has, so they never join a real group.
    const int b = valid ? bucket_of(static_cast<int64_t>(ids[s]), num_experts) : -1;
    const unsigned group = __match_any_sync(kFullMask, b);
    if (valid && lane == __ffs(group) - 1) bucket_count[b] += __popc(group);
    __syncwarp();
  }
  int32_t* out = counts + static_cast<int64_t>(blockIdx.x) * num_buckets;
  for (int b = lane; b < num_buckets; b += 32) out[b] = bucket_count[b];
}

// Pass 2: counts[chunk][b] <- first output row of this chunk's slots in bucket b, and
// expert_offsets[b] <- first row of bucket b. Thread t owns buckets [t*per, (t+1)*per).
__global__ void __launch_bounds__(kScanThreads)
    scan_kernel(int32_t* __restrict__ counts, int64_t chunks, int num_experts,
                int32_t* __restrict__ expert_offsets) {
  using BlockScan = cub::BlockScan<int32_t, kScanThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  const int num_buckets = num_experts + 1;
  const int per = (num_buckets + kScanThreads - 1) / kScanThreads;
  const int first = threadIdx.x * per;
  const int last = min(first + per, num_buckets);

  int32_t owned = 0;  // slots in this thread's buckets
  for (int b = first; b < last; ++b) {
    for (int64_t c = 0; c < chunks; ++c) owned += counts[c * num_buckets + b];
  }
  int32_t row;
  BlockScan(scan_storage).ExclusiveSum(owned, row);
  for (int b = first; b < last; ++b) {
    expert_offsets[b] = row;
    for (int64_t c = 0; c < chunks; ++c) {
      int32_t& v = counts[c * num_buckets + b];
      const int32_t n = v;
      v = row;
      row += n;
    }
  }
}

// Pass 3: each warp hands out rows to its chunk's slots in slot order.
template <typename IdT>
__global__ void scatter_kernel(const IdT* __restrict__ ids, int64_t num_slots, int num_experts,
                               const int32_t* __restrict__ starts,
                               int32_t* __restrict__ sorted_slots,
                               int32_t* __restrict__ slot_to_row) {
  PM_DYNAMIC_SMEM(int32_t, next_row);  // [E+1]
  const int num_buckets = num_experts + 1;
  const int lane = threadIdx.x;
  const int32_t* chunk_starts = starts + static_cast<int64_t>(blockIdx.x) * num_buckets;
  for (int b = lane; b < num_buckets; b += 32) next_row[b] = chunk_starts[b];
  __syncwarp();
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int step = 0; step < kChunk; step += 32) {
    const int64_t s = begin + step + lane;
    const bool valid = s < num_slots;
    const int b = valid ? bucket_of(static_cast<int64_t>(ids[s]), num_experts) : -1;
    const unsigned group = __match_any_sync(kFullMask, b);
    if (valid) {
      const int32_t row = next_row[b] + __popc(group & lanes_below);
      sorted_slots[row] = static_cast<int32_t>(s);
      slot_to_row[s] = row;
    }
    __syncwarp();  // every lane has read next_row before the group leader advances it
    if (valid && lane == __ffs(group) - 1) next_row[b] += __popc(group);
    __syncwarp();
  }
}

}  // namespace

size_t moe_align_workspace_bytes(int64_t num_slots, int num_experts) {
  return static_cast<size_t>(num_chunks(num_slots)) * (num_experts + 1) * sizeof(int32_t);
}

template <typename IdT>
cudaError_t moe_align_cuda(const IdT* topk_ids, int64_t num_slots, int num_experts,
                           int32_t* sorted_slots, int32_t* slot_to_row, int32_t* expert_offsets,
                           void* workspace, cudaStream_t stream) {
  if (num_experts < 1 || num_experts > kMoeAlignMaxExperts) return cudaErrorInvalidValue;
  const int64_t chunks = num_chunks(num_slots);
  auto* counts = static_cast<int32_t*>(workspace);  // [chunks, E+1]
  // At most kMoeAlignMaxExperts + 1 counters: 32 KiB, inside the default 48 KiB limit.
  const size_t smem = static_cast<size_t>(num_experts + 1) * sizeof(int32_t);
  if (chunks > 0) {
    PM_CUDA_TRY(launch_kernel(&count_kernel<IdT>, static_cast<unsigned>(chunks), 32, smem, stream,
                              topk_ids, num_slots, num_experts, counts));
  }
  PM_CUDA_TRY(launch_kernel(&scan_kernel, 1, kScanThreads, 0, stream, counts, chunks, num_experts,
                            expert_offsets));
  if (chunks > 0) {
    PM_CUDA_TRY(launch_kernel(&scatter_kernel<IdT>, static_cast<unsigned>(chunks), 32, smem, stream,
                              topk_ids, num_slots, num_experts, counts, sorted_slots, slot_to_row));
  }
  return cudaSuccess;
}

template cudaError_t moe_align_cuda<int32_t>(const int32_t*, int64_t, int, int32_t*, int32_t*,
                                             int32_t*, void*, cudaStream_t);
template cudaError_t moe_align_cuda<int64_t>(const int64_t*, int64_t, int, int32_t*, int32_t*,
                                             int32_t*, void*, cudaStream_t);

}  // namespace pearlmoe::routing
