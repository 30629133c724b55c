// The emulated twin of csrc/kernels/ptx.cuh (same namespace, functions and semantics), selected
// there by PEARLMOE_EMULATE.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "runtime.h"

namespace pearlmoe::ptx {

inline uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

inline void cp_async_16(uint32_t dst, const void* src, bool valid) {
  ::emu::cp_async(dst, src, valid ? 16 : 0);
}

inline void cp_async_commit() { ::emu::commit(); }

template <int N>
inline void cp_async_wait() {
  ::emu::wait_group(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  ::emu::me().in[0] = addr;
  ::emu::collective(::emu::kLdm);
  for (int i = 0; i < 4; ++i) r[i] = static_cast<uint32_t>(::emu::me().out[i]);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  ::emu::me().in[0] = addr;
  ::emu::collective(::emu::kLdmT);
  for (int i = 0; i < 4; ++i) r[i] = static_cast<uint32_t>(::emu::me().out[i]);
}

template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  auto& t = ::emu::me();
  for (int i = 0; i < 4; ++i) t.in[i] = a[i];
  t.in[4] = b0;
  t.in[5] = b1;
  std::memcpy(&t.in[6], d, 16);
  ::emu::collective(std::is_same_v<T, __nv_bfloat16> ? ::emu::kMmaBf16 : ::emu::kMmaF16);
  std::memcpy(d, &t.out[0], 16);
}

// ex2.approx.ftz: subnormal results flush to zero (2^-inf = +0).
inline float ex2(float x) {
  const float y = std::exp2(x);
  return std::fabs(y) < 1.17549435e-38f ? 0.0f : y;
}

}  // namespace pearlmoe::ptx
