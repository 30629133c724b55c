// The CUDA language and runtime surface the kernels use, as plain C++ for the emulator: keywords,
// dim3 and vector types, bf16/fp16 with round-to-nearest-even conversions, device math, error
// codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
// A __shared__ local is one object per block; blocks run one at a time, so a static is that object.
#define __shared__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

using cudaError_t = int;
enum : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInsufficientDriver = 35,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// ---- 16-bit floats ------------------------------------------------------------------------------
struct __half {
  uint16_t x;
};
struct __half2 {
  uint16_t x, y;
};
struct __nv_bfloat16 {
  uint16_t x;
};
struct __nv_bfloat162 {
  uint16_t x, y;
};

namespace emu {
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays a (quiet) NaN
  u += 0x7fffu + ((u >> 16) & 1u);                     // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_half_bits(float f) {
  const _Float16 h = static_cast<_Float16>(f);  // round to nearest even, as __float2half
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline float half_bits_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
}  // namespace emu

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {emu::float_to_bf16_bits(a), emu::float_to_bf16_bits(b)};
}
inline __half2 __floats2half2_rn(float a, float b) {
  return {emu::float_to_half_bits(a), emu::float_to_half_bits(b)};
}
inline float __bfloat162float(__nv_bfloat16 v) { return emu::bf16_bits_to_float(v.x); }
inline float __half2float(__half v) { return emu::half_bits_to_float(v.x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return {emu::float_to_bf16_bits(f)}; }
inline __half __float2half(float f) { return {emu::float_to_half_bits(f)}; }

// ---- device math and integer intrinsics ---------------------------------------------------------
// CUDA overloads min/max for every integer width; these cover the kernels' uses.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline int __ffs(unsigned x) { return __builtin_ffs(static_cast<int>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
