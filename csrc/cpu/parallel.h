// parallel_for for pearlmoe's CPU kernels, with the caller's thread-local state (inference mode,
// grad mode, dispatch keys) installed in every worker, and below autograd there as a kernel is.
// Pool threads start with their own defaults, so a body that calls ATen ops would otherwise fail
// on inference tensors ("Inplace update to inference tensor outside InferenceMode") or take
// autograd paths: with grad enabled, ~7% of multi-threaded prefill attention calls failed with
// "a leaf Variable that requires grad is being used in an in-place operation" before the guard.
//
// Inside a fused step (a PoolScope) the work goes to the claiming pool (thread_pool.h: a join
// waits only for work a thread has started, so a helper the scheduler has descheduled does not
// stall every region); elsewhere, or with PEARLMOE_CPU_POOL=openmp, to at::parallel_for's
// OpenMP region.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <algorithm>
#include <cstdint>

#include "thread_pool.h"

namespace pearlmoe::cpu {

// Chunks per thread in a claiming job. One, as OpenMP's static schedule: every thread runs the
// same part of a kernel each step (its slice of the weights stays in its core's cache), and a
// part whose thread has not started is still the caller's to take. Four (a helper's lag costing
// less) measured ~10% slower on speculative decoding at batch 4 and no better under load.
constexpr int64_t kChunksPerThread = 1;

// Elements of elementwise work per piece (ATen's GRAIN_SIZE): below it a call stays on one thread.
constexpr int64_t kElementwiseGrain = 32768;

// at::parallel_for's OpenMP region, with the state installed in each team thread.
template <typename F>
void parallel_for_openmp(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(b, e);
  });
}

// f(b, e) over [begin, end) in about-equal pieces, no more of them than the range holds grains
// (as at::parallel_for). A range that is one piece, a single-threaded caller or a call from
// inside a parallel region or a pool job runs inline on the calling thread, whose state is
// already right: capturing and installing the state costs ~1-2 us a call (the profiler's
// callbacks, autocast, Python objects), as much as a decode step's small kernels.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  const int threads = in_pool_job() ? 1 : at::get_num_threads();
  if (end - begin <= grain || threads == 1 || at::in_parallel_region()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(begin, end);
    return;
  }
  if (!pool_claims() || !in_pool_scope()) {
    parallel_for_openmp(begin, end, grain, f);
    return;
  }
  const int64_t n = end - begin;
  const int64_t piece = std::max<int64_t>(grain, 1);
  const int64_t most = std::min((n + piece - 1) / piece, threads * kChunksPerThread);
  const int64_t size = (n + most - 1) / most;
  const int64_t chunks = (n + size - 1) / size;
  struct Job {
    const F& f;
    int64_t begin, end, size;
  } job{f, begin, end, size};
  const ChunkFn run = [](void* ctx, int64_t chunk) {
    const Job& j = *static_cast<const Job*>(ctx);
    const int64_t b = j.begin + chunk * j.size;
    j.f(b, std::min(j.end, b + j.size));
  };
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const CallerState state = CallerState::capture();  // with autograd below, for the helpers too
  pool_run(chunks, threads, &state, run, &job);
}

}  // namespace pearlmoe::cpu
