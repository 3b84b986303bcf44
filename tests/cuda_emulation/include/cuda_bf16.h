// cuda_bf16.h of the CPU emulation: __nv_bfloat16 as the top 16 bits of an fp32, conversions
// rounding to nearest even (NaN stays NaN), as the hardware's cvt.rn.bf16.f32 and torch do.
#pragma once

#include <cstdint>

#include "cuda_fp16.h"

struct alignas(2) __nv_bfloat16 {
  uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 b) { return cuda_emulation::bits_float(static_cast<uint32_t>(b.bits) << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {
  const uint32_t u = cuda_emulation::float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(rounded >> 16)};
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16{u}; }
