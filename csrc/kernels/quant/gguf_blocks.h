// llama.cpp's GGUF block formats that pearlmoe multiplies in place, without expanding the weight
// first: each row of a weight [N, K] is K / 32 blocks of 32 values, each block its own scale.
//
//   Q4_0  18 bytes: d (fp16), 16 bytes of 4-bit q        w = (q - 8) · d
//   Q4_1  20 bytes: d, m (fp16), 16 bytes of 4-bit q     w = q · d + m
//   Q8_0  34 bytes: d (fp16), 32 int8 q                  w = q · d
//
// In a 4-bit block byte j holds value j in its low nibble and value j + 16 in its high nibble.
// Every w is computed exactly in fp32 (q · d needs at most 15 significant bits) except Q4_1's
// one rounding of the sum q · d + m, so any kernel that follows these formulas in fp32 expands a
// block to the same bits. Torch-free, host and device.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common.h"

namespace pearlmoe::quant {

enum class Format : int { kQ4_0 = 0, kQ4_1 = 1, kQ8_0 = 2 };

constexpr int kBlockValues = 32;

PM_HD int block_bytes(Format f) { return f == Format::kQ4_0 ? 18 : f == Format::kQ4_1 ? 20 : 34; }

// IEEE binary16 bits to fp32 (exact; subnormals, infinities and NaN kept).
PM_HD float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: shift the leading one into the implicit bit
    uint32_t e = 113u;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mantissa & 0x3ffu) << 13);
  }
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

PM_HD uint16_t load_u16(const uint8_t* p) {
  return static_cast<uint16_t>(p[0] | (static_cast<uint16_t>(p[1]) << 8));
}

// The 32 values of one block, in fp32.
PM_HD void dequantize_block(Format f, const uint8_t* block, float* out) {
  const float d = half_to_float(load_u16(block));
  if (f == Format::kQ8_0) {
    for (int i = 0; i < 32; ++i) out[i] = static_cast<float>(static_cast<int8_t>(block[2 + i])) * d;
    return;
  }
  const bool offset = f == Format::kQ4_1;
  const float m = offset ? half_to_float(load_u16(block + 2)) : 0.f;
  const uint8_t* q = block + (offset ? 4 : 2);
  for (int j = 0; j < 16; ++j) {
    const int lo = q[j] & 0x0f, hi = q[j] >> 4;
    if (offset) {
      out[j] = static_cast<float>(lo) * d + m;
      out[j + 16] = static_cast<float>(hi) * d + m;
    } else {
      out[j] = static_cast<float>(lo - 8) * d;
      out[j + 16] = static_cast<float>(hi - 8) * d;
    }
  }
}

}  // namespace pearlmoe::quant
