// cuda_fp16.h of the CPU emulation: __half as IEEE binary16 bits, conversions rounding to nearest
// even (as the hardware's cvt.rn and torch's CPU kernels do).
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda_runtime.h"

struct alignas(2) __half {
  uint16_t bits;
};

namespace cuda_emulation {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace cuda_emulation

inline float __half2float(__half h) {
  // _Float16 is IEEE binary16 on x86-64 (GCC >= 12): exact widening.
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half(float f) {
  const _Float16 v = static_cast<_Float16>(f);  // round to nearest even
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
inline __half __float2half_rn(float f) { return __float2half(f); }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
