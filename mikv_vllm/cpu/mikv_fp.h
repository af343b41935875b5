// Number formats of the MiKV C++ ops: fp16 / bf16 / fp8 e4m3fn conversions, fp16 rounding toward
// -inf / +inf (the quantizer's scale and zero), and the hi-tier copies (load_hi / store_hi).
#pragma once
#include <torch/extension.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
#endif
}

inline void halves_to_floats(const uint16_t* __restrict h, int64_t n, float* __restrict out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
#endif
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

inline uint16_t float_to_half_bits(float x) { return c10::Half(x).x; }  // round to nearest even

// Largest fp16 <= x (x already clamped to +-65504), as core.quant.fp16_round_down.
inline uint16_t fp16_round_down(float x) {
  uint16_t h = float_to_half_bits(x);
  if (half_to_float(h) > x) {
    if ((h & 0x7fff) == 0) return 0x8001;        // +-0 -> smallest negative subnormal
    return (h & 0x8000) ? h + 1 : h - 1;          // negative: away from 0; positive: toward 0
  }
  return h;
}

// Smallest fp16 >= x, as core.quant.fp16_round_up.
inline uint16_t fp16_round_up(float x) {
  uint16_t h = float_to_half_bits(x);
  if (half_to_float(h) < x) {
    if ((h & 0x7fff) == 0) return 0x0001;
    return (h & 0x8000) ? h - 1 : h + 1;
  }
  return h;
}

// fp8 e4m3fn -> fp32 for all 256 bit patterns (exact; 0x7f / 0xff are NaN).
struct Fp8Table {
  float t[256];
  Fp8Table() {
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
  }
};

constexpr float kFp8Max = 448.f;  // largest finite e4m3fn value (torch.finfo(torch.float8_e4m3fn).max)

inline void load_hi(const uint8_t* base, int64_t dtype, int64_t D, float* __restrict out) {
  if (dtype == 2) {
    std::memcpy(out, base, D * sizeof(float));
  } else if (dtype == 0) {
    halves_to_floats(reinterpret_cast<const uint16_t*>(base), D, out);
  } else if (dtype == 3) {
    static const Fp8Table tab;
    for (int64_t d = 0; d < D; ++d) out[d] = tab.t[base[d]];
  } else {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(base);
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(c10::BFloat16(h[d], c10::BFloat16::from_bits()));
  }
}

// torch.finfo(hi dtype).max as fp32: 65504, bf16 max, fp32 max, 448 (fp8 e4m3fn).
inline float hi_max(int64_t dtype) {
  return dtype == 0 ? 65504.f : dtype == 1 ? 3.3895313892515355e38f : dtype == 3 ? kFp8Max
                                                                                  : std::numeric_limits<float>::max();
}

// As core.quant.to_hi: clamped to the hi dtype's finite range, NaN stored as 0, then rounded to nearest even.
inline void store_hi(uint8_t* base, int64_t dtype, int64_t D, const float* x) {
  const float top = hi_max(dtype);
  auto clamp = [top](float v) { return std::isnan(v) ? 0.f : std::min(std::max(v, -top), top); };
  if (dtype == 2) {
    for (int64_t d = 0; d < D; ++d) {
      const float c = clamp(x[d]);
      std::memcpy(base + d * sizeof(float), &c, sizeof(float));
    }
  } else if (dtype == 0) {
    uint16_t* h = reinterpret_cast<uint16_t*>(base);
    for (int64_t d = 0; d < D; ++d) h[d] = float_to_half_bits(clamp(x[d]));
  } else if (dtype == 3) {
    for (int64_t d = 0; d < D; ++d) base[d] = c10::Float8_e4m3fn(clamp(x[d])).x;
  } else {
    uint16_t* h = reinterpret_cast<uint16_t*>(base);
    for (int64_t d = 0; d < D; ++d) h[d] = c10::BFloat16(clamp(x[d])).x;
  }
}

// An element as the lo quantizer sees it (core.quant.finite_for_lo): NaN -> 0, clamped to +-65504.
inline float finite_for_lo(float v) { return std::isnan(v) ? 0.f : std::min(std::max(v, -65504.f), 65504.f); }

#ifdef __AVX512F__
inline __m512 finite_for_lo512(__m512 v) {   // finite_for_lo in 16 lanes
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-65504.f)), _mm512_set1_ps(65504.f));
  return _mm512_mask_mov_ps(v, nan, _mm512_setzero_ps());
}
#endif

}  // namespace
