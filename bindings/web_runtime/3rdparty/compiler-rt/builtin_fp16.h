/*
 * qwen35-mobile: builtin_fp16.h for building TVM's web runtime from the wheel
 * (see include/tvm/support/io.h).  The two conversion templates the runtime's
 * sources call (sort.cc's float16 keys, builtin_fp16.cc):
 *   __extendXfYf2__<SRC_T, SRC_REP_T, SRC_SIG_BITS, DST_T, DST_REP_T, DST_SIG_BITS>(a)
 *   __truncXfYf2__ <same parameters>(a)
 * convert between IEEE-754 binary formats given by their representation type and
 * significand width; a type that is an unsigned integer carries the raw bits
 * (uint16_t for half).  Rounding is to nearest, ties to even; overflow gives
 * infinity; NaN stays a (quiet) NaN; subnormals are exact both ways.  Written
 * from the IEEE-754 definition; tests/test_web_runtime.py checks it against
 * numpy on every half value.
 */
#ifndef QWEN35_BUILTIN_FP16_H_
#define QWEN35_BUILTIN_FP16_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qwen35_fp {

template <typename T, typename REP>
inline REP ToRep(T a) {
  static_assert(sizeof(T) == sizeof(REP), "representation size");
  REP r;
  std::memcpy(&r, &a, sizeof(r));
  return r;
}

template <typename T, typename REP>
inline T FromRep(REP r) {
  static_assert(sizeof(T) == sizeof(REP), "representation size");
  T a;
  std::memcpy(&a, &r, sizeof(a));
  return a;
}

/*! \brief x / 2^s rounded to nearest, ties to even (s <= 0 shifts left). */
inline uint64_t RoundShift(uint64_t x, int s) {
  if (s <= 0) return x << -s;
  if (s >= 64) return 0;
  uint64_t q = x >> s;
  uint64_t rem = x & ((uint64_t(1) << s) - 1);
  uint64_t half = uint64_t(1) << (s - 1);
  if (rem > half || (rem == half && (q & 1))) ++q;
  return q;
}

template <typename SRC_REP_T, int SRC_SIG_BITS, typename DST_REP_T, int DST_SIG_BITS>
inline DST_REP_T Convert(SRC_REP_T a) {
  constexpr int kSrcBits = sizeof(SRC_REP_T) * 8;
  constexpr int kDstBits = sizeof(DST_REP_T) * 8;
  constexpr int kSrcInf = (1 << (kSrcBits - SRC_SIG_BITS - 1)) - 1;
  constexpr int kDstInf = (1 << (kDstBits - DST_SIG_BITS - 1)) - 1;
  constexpr int kSrcBias = kSrcInf >> 1;
  constexpr int kDstBias = kDstInf >> 1;
  const uint64_t bits = static_cast<uint64_t>(a);
  const uint64_t sign = (bits >> (kSrcBits - 1)) & 1;
  const int exp = static_cast<int>((bits >> SRC_SIG_BITS) & kSrcInf);
  uint64_t sig = bits & ((uint64_t(1) << SRC_SIG_BITS) - 1);
  const uint64_t dst_sign = sign << (kDstBits - 1);
  const uint64_t dst_inf = static_cast<uint64_t>(kDstInf) << DST_SIG_BITS;
  if (exp == kSrcInf) {  // infinity or NaN
    uint64_t nan = sig != 0 ? (uint64_t(1) << (DST_SIG_BITS - 1)) : 0;
    return static_cast<DST_REP_T>(dst_sign | dst_inf | nan);
  }
  if (exp == 0 && sig == 0) return static_cast<DST_REP_T>(dst_sign);
  int e;  // value = sig * 2^(e - SRC_SIG_BITS), sig with its leading one at SRC_SIG_BITS
  if (exp == 0) {
    e = 1 - kSrcBias;
    while (!(sig & (uint64_t(1) << SRC_SIG_BITS))) {
      sig <<= 1;
      --e;
    }
  } else {
    e = exp - kSrcBias;
    sig |= uint64_t(1) << SRC_SIG_BITS;
  }
  const int dexp = e + kDstBias;
  if (dexp >= kDstInf) return static_cast<DST_REP_T>(dst_sign | dst_inf);
  uint64_t out;
  if (dexp >= 1) {
    // Rounded significand keeps its leading one; a carry out of it moves into the exponent.
    uint64_t rounded = RoundShift(sig, SRC_SIG_BITS - DST_SIG_BITS);
    out = (static_cast<uint64_t>(dexp - 1) << DST_SIG_BITS) + rounded;
    if (out >= dst_inf) out = dst_inf;
  } else {
    out = RoundShift(sig, SRC_SIG_BITS - DST_SIG_BITS + (1 - dexp));  // subnormal (or zero)
  }
  return static_cast<DST_REP_T>(dst_sign | out);
}

template <typename T, typename REP>
inline REP AsRep(T a) {
  if constexpr (std::is_integral_v<T>) {
    return static_cast<REP>(a);
  } else {
    return ToRep<T, REP>(a);
  }
}

template <typename T, typename REP>
inline T FromRepAs(REP r) {
  if constexpr (std::is_integral_v<T>) {
    return static_cast<T>(r);
  } else {
    return FromRep<T, REP>(r);
  }
}

}  // namespace qwen35_fp

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __extendXfYf2__(SRC_T a) {
  SRC_REP_T rep = qwen35_fp::AsRep<SRC_T, SRC_REP_T>(a);
  return qwen35_fp::FromRepAs<DST_T, DST_REP_T>(
      qwen35_fp::Convert<SRC_REP_T, SRC_SIG_BITS, DST_REP_T, DST_SIG_BITS>(rep));
}

template <typename SRC_T, typename SRC_REP_T, int SRC_SIG_BITS, typename DST_T, typename DST_REP_T,
          int DST_SIG_BITS>
static inline DST_T __truncXfYf2__(SRC_T a) {
  SRC_REP_T rep = qwen35_fp::AsRep<SRC_T, SRC_REP_T>(a);
  return qwen35_fp::FromRepAs<DST_T, DST_REP_T>(
      qwen35_fp::Convert<SRC_REP_T, SRC_SIG_BITS, DST_REP_T, DST_SIG_BITS>(rep));
}

#endif  // QWEN35_BUILTIN_FP16_H_
