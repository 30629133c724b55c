// Thread indices, barriers and warp intrinsics of the emulated GPU (see machine.h).
#pragma once

#include "machine.h"

namespace emu {
inline uint3 thread_idx() { return {static_cast<unsigned>(blk()->cur), 0, 0}; }
inline uint3 block_idx() { return blk()->bidx; }
inline uint3 grid_dim() { return {blk()->grid.x, blk()->grid.y, blk()->grid.z}; }
inline uint3 block_dim() { return {blk()->block.x, blk()->block.y, blk()->block.z}; }

template <typename T>
inline T shuffle(Kind k, unsigned mask, T v, int arg) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  if (mask != 0xffffffffu) fail("partial-mask warp shuffle (the kernels use full masks)");
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  me().in[0] = bits;
  me().in[1] = static_cast<uint64_t>(static_cast<int64_t>(arg));
  collective(k);
  const uint32_t o = static_cast<uint32_t>(me().out[0]);
  T r;
  std::memcpy(&r, &o, 4);
  return r;
}

inline uint32_t warp_op(Kind k, unsigned mask, uint32_t v) {
  if (mask != 0xffffffffu) fail("partial-mask warp collective (the kernels use full masks)");
  me().in[0] = v;
  collective(k);
  return static_cast<uint32_t>(me().out[0]);
}
}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define gridDim (::emu::grid_dim())
#define blockDim (::emu::block_dim())

inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::emu::fail("partial-mask __syncwarp");
  ::emu::collective(::emu::kSyncWarp);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return ::emu::shuffle(::emu::kShflXor, mask, v, lane_mask);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  return ::emu::shuffle(::emu::kShflUp, mask, v, static_cast<int>(delta));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane) {
  return ::emu::shuffle(::emu::kShflIdx, mask, v, src_lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::emu::warp_op(::emu::kBallot, mask, pred ? 1u : 0u);
}
inline int __reduce_max_sync(unsigned mask, int v) {
  return static_cast<int>(::emu::warp_op(::emu::kReduceMax, mask, static_cast<uint32_t>(v)));
}
inline unsigned __match_any_sync(unsigned mask, int v) {
  return ::emu::warp_op(::emu::kMatchAny, mask, static_cast<uint32_t>(v));
}
inline size_t __cvta_generic_to_shared(const void* p) {
  return static_cast<size_t>(static_cast<const uint8_t*>(p) - ::emu::dynamic_smem());
}
