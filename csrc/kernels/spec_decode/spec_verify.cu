// Speculative-decoding verification on the GPU: one block per sequence walks its drafts in order
// (the first rejection ends the walk). Per row it needs either one argmax over the vocabulary
// (greedy: it decides acceptance and is the correction) or two probabilities; only the rejected
// (or bonus) row is swept for sampling, with a block-wide inverse CDF. Deterministic: fixed
// reduction order, no atomics. Total like the CPU twin (spec_verify_cpu.h): out-of-range draft
// ids are rejected unread, rows without mass give token 0.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "../launch.cuh"
#include "spec_verify.h"

namespace pearlmoe::spec_decode {
namespace {

constexpr int kThreads = 256;

struct ArgMax {
  float value;
  int64_t index;
};

struct ArgMaxOp {
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
  }
};

using ArgMaxReduce = cub::BlockReduce<ArgMax, kThreads>;
using SumScan = cub::BlockScan<double, kThreads>;
using MaxReduce = cub::BlockReduce<int64_t, kThreads>;

struct MaxOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

union SharedStorage {
  typename ArgMaxReduce::TempStorage argmax;
  typename SumScan::TempStorage scan;
  typename MaxReduce::TempStorage max;
};

// argmax of p [V], ties to the lower index; the result is valid in every thread.
__device__ int64_t block_argmax(const float* p, int64_t vocab, SharedStorage& storage,
                                int64_t& broadcast) {
  ArgMax best{-INFINITY, vocab};
  for (int64_t v = threadIdx.x; v < vocab; v += kThreads) best = ArgMaxOp()(best, {p[v], v});
  const ArgMax result = ArgMaxReduce(storage.argmax).Reduce(best, ArgMaxOp());
  if (threadIdx.x == 0) broadcast = result.index < vocab ? result.index : 0;
  __syncthreads();
  const int64_t index = broadcast;
  __syncthreads();
  return index;
}

// Inverse-CDF sample of max(p - q, 0) (q may be null: p) with u in [0, 1), as the CPU twin
// does. Each thread owns a contiguous chunk of the vocabulary; an exclusive scan of the chunk
// sums finds the one chunk whose interval holds u · total, and its thread walks it.
__device__ int64_t block_sample(const float* p, const float* q, int64_t vocab, float u,
                                SharedStorage& storage, int64_t& broadcast) {
  auto weight = [&](int64_t v) -> double { return q == nullptr ? p[v] : fmaxf(p[v] - q[v], 0.f); };
  const int64_t chunk = (vocab + kThreads - 1) / kThreads;
  const int64_t first = static_cast<int64_t>(threadIdx.x) * chunk;
  const int64_t begin = first < vocab ? first : vocab;
  const int64_t end = begin + chunk < vocab ? begin + chunk : vocab;
  double mine = 0.0;
  int64_t last_positive = -1;
  for (int64_t v = begin; v < end; ++v) {
    const double w = weight(v);
    mine += w;
    if (w > 0.0) last_positive = v;
  }
  double before, total;
  SumScan(storage.scan).ExclusiveSum(mine, before, total);
  __syncthreads();
  if (!(total > 0.0)) {  // no residual mass (p == q up to rounding): sample p itself
    return q == nullptr ? 0 : block_sample(p, nullptr, vocab, u, storage, broadcast);
  }
  const double threshold = static_cast<double>(u) * total;
  if (threadIdx.x == 0) broadcast = -1;
  __syncthreads();
  if (mine > 0.0 && threshold >= before && threshold < before + mine) {  // at most one thread
    double cum = before;
    int64_t pick = last_positive;
    for (int64_t v = begin; v < end; ++v) {
      cum += weight(v);
      if (weight(v) > 0.0 && cum > threshold) {
        pick = v;
        break;
      }
    }
    broadcast = pick;
  }
  __syncthreads();
  int64_t index = broadcast;
  __syncthreads();
  if (index < 0) {  // rounding put u · total at the very top: the last token with mass
    index = MaxReduce(storage.max).Reduce(last_positive, MaxOp());
    if (threadIdx.x == 0) broadcast = index;
    __syncthreads();
    index = broadcast;
    __syncthreads();
  }
  return index;
}

__global__ void __launch_bounds__(kThreads) spec_verify_kernel(SpecVerifyParams p) {
  __shared__ SharedStorage storage;
  __shared__ int64_t broadcast;
  const int64_t b = blockIdx.x, n = p.num_drafts, vocab = p.vocab;
  const float* target = p.target_probs + b * (n + 1) * vocab;
  const int64_t* drafts = p.draft_ids + b * n;
  const float* draft = p.draft_probs == nullptr ? nullptr : p.draft_probs + b * n * vocab;
  const float* u = p.uniforms == nullptr ? nullptr : p.uniforms + b * (n + 1);
  int64_t* tokens = p.tokens + b * (n + 1);
  for (int64_t i = threadIdx.x; i <= n; i += kThreads) tokens[i] = -1;
  __syncthreads();

  for (int64_t i = 0; i <= n; ++i) {
    const float* row = target + i * vocab;
    const bool bonus = i == n;
    // Greedy: the row's argmax decides acceptance and is the correction if the draft is rejected.
    const int64_t best = p.sampling ? -1 : block_argmax(row, vocab, storage, broadcast);
    bool accept = false;
    if (!bonus) {
      const int64_t x = drafts[i];
      accept =
          x >= 0 && x < vocab && (p.sampling ? u[i] * draft[i * vocab + x] <= row[x] : x == best);
    }
    if (accept) {
      if (threadIdx.x == 0) tokens[i] = drafts[i];
      continue;
    }
    int64_t token = best;
    if (p.sampling) {
      token =
          block_sample(row, bonus ? nullptr : draft + i * vocab, vocab, u[n], storage, broadcast);
    }
    if (threadIdx.x == 0) {
      tokens[i] = token;
      p.num_accepted[b] = static_cast<int32_t>(i);
    }
    return;
  }
}

}  // namespace

cudaError_t spec_verify_cuda(const SpecVerifyParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.vocab < 1) return cudaErrorInvalidValue;
  return launch_kernel(&spec_verify_kernel, static_cast<unsigned>(p.batch), kThreads, 0, stream, p);
}

}  // namespace pearlmoe::spec_decode
