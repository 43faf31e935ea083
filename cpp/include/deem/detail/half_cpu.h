// IEEE half and bfloat16 conversions for the CPU kernels (no compiler extensions needed).
#pragma once

#include <cstdint>
#include <cstring>

namespace deem::detail {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float to_float(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

inline BFloat16 bf16_from_float(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return BFloat16{static_cast<uint16_t>(u >> 16)};
}

inline float to_float(Half h) {
  const uint32_t sign = (h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return bits_to_float(sign);
    int e = -1;  // subnormal: normalise
    do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
    return bits_to_float(sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ffu) << 13);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | mant << 13);
  return bits_to_float(sign | (exp + 112) << 23 | mant << 13);
}

inline Half half_from_float(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};       // NaN
  if (abs >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};      // overflow -> inf
  if (abs < 0x38800000u) {                                                          // subnormal or zero
    if (abs < 0x33000000u) return Half{static_cast<uint16_t>(sign)};
    const uint32_t e = abs >> 23;
    const uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return Half{static_cast<uint16_t>(sign | h)};
  }
  uint32_t h = ((abs - 0x38000000u) >> 13);
  const uint32_t rem = abs & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return Half{static_cast<uint16_t>(sign | h)};
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

// Loads into and stores from the accumulation type deem::acc_t<T> (deem/common.h).
template <typename T> struct Convert;
template <> struct Convert<float> {
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};
template <> struct Convert<double> {
  static double load(double v) { return v; }
  static double store(double v) { return v; }
};
template <> struct Convert<Half> {
  static float load(Half v) { return to_float(v); }
  static Half store(float v) { return half_from_float(v); }
};
template <> struct Convert<BFloat16> {
  static float load(BFloat16 v) { return to_float(v); }
  static BFloat16 store(float v) { return bf16_from_float(v); }
};

}  // namespace deem::detail
