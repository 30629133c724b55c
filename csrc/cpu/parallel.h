// parallel_for for pearlmoe's CPU kernels: at::parallel_for, with the caller's thread-local state
// (inference mode, grad mode, dispatch keys) installed in every worker, and below autograd there
// as a kernel is. OpenMP workers start with their own defaults, so a body that calls ATen ops
// would otherwise fail on inference tensors ("Inplace update to inference tensor outside
// InferenceMode") or take autograd paths: with grad enabled, ~7% of multi-threaded prefill
// attention calls failed with "a leaf Variable that requires grad is being used in an in-place
// operation" before the explicit guard.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cstdint>

namespace pearlmoe::cpu {

// A range that is one chunk, or a single-threaded pool, runs inline on the calling thread, whose
// state is already right: capturing and installing the state costs ~1-2 us a call (the
// profiler's callbacks, autocast, Python objects), as much as a decode step's small kernels.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  if (end - begin <= grain || at::get_num_threads() == 1 || at::in_parallel_region()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(begin, end);
    return;
  }
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(state);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    f(b, e);
  });
}

}  // namespace pearlmoe::cpu
