// cub::BlockScan::ExclusiveSum for the emulator: sums in thread order (cub's tree order can differ
// at rounding level for floating types; exact for integers).
#pragma once

#include <vector>

#include "../../emu/runtime.h"

namespace cub {
template <typename T, int kThreads>
struct BlockScan {
  struct TempStorage {};
  explicit BlockScan(TempStorage&) {}
  void ExclusiveSum(T in, T& out) {
    T total;
    ExclusiveSum(in, out, total);
  }
  void ExclusiveSum(T in, T& out, T& total) {
    static std::vector<T> s(kThreads);
    const int tid = static_cast<int>(threadIdx.x);
    s[tid] = in;
    __syncthreads();
    T before = 0, all = 0;
    for (int i = 0; i < kThreads; ++i) {
      if (i < tid) before += s[i];
      all += s[i];
    }
    out = before;
    total = all;
    __syncthreads();
  }
};
}  // namespace cub
