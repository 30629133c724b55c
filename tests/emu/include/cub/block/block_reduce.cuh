// cub::BlockReduce for the emulator: the same contract (the result is defined in thread 0 only;
// other threads get their own input back, so code that reads it elsewhere fails the tests).
#pragma once

#include <vector>

#include "../../emu/runtime.h"

namespace cub {
template <typename T, int kThreads>
struct BlockReduce {
  struct TempStorage {};
  explicit BlockReduce(TempStorage&) {}
  template <class Op>
  T Reduce(T in, Op op) {
    static std::vector<T> s(kThreads);
    s[threadIdx.x] = in;
    __syncthreads();
    T r = s[0];
    for (int i = 1; i < kThreads; ++i) r = op(r, s[i]);
    __syncthreads();
    return threadIdx.x == 0 ? r : in;
  }
};
}  // namespace cub
