// The lo tier's INT2/3/4/8 codes: code tables, unpack (AVX-512 VBMI where built), dequantize, and the
// quantizer of one token (core.quant.quantize).
#pragma once
#include "mikv_fp.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define MIKV_AVX512_UNPACK 1
#endif

namespace {

// Code tables: entry [m][x][j] is what byte m = x of a `bits`-byte chunk adds to code j of the 8
// codes it holds (little-endian bit stream; codes are bit fields, so they add up).
struct CodeTable {
  std::vector<float> t;  // [bits][256][8]
  explicit CodeTable(int bits) : t(static_cast<size_t>(bits) * 256 * 8, 0.f) {
    for (int m = 0; m < bits; ++m)
      for (int x = 0; x < 256; ++x)
        for (int j = 0; j < 8; ++j)
          for (int k = 0; k < 8; ++k) {
            int b = 8 * m + k - j * bits;
            if (b >= 0 && b < bits && ((x >> k) & 1)) t[(m * 256 + x) * 8 + j] += static_cast<float>(1 << b);
          }
  }
};

const float* code_table(int bits) {
  static const CodeTable t2(2), t3(3), t4(4);
  return bits == 2 ? t2.t.data() : bits == 3 ? t3.t.data() : t4.t.data();
}

#ifdef MIKV_AVX512_UNPACK
// 32 codes of BITS (2, 3, 4) bits per step: 16-bit word w = bytes (w*BITS)/8 and the next one (vpermb),
// shifted right by (w*BITS)%8 and masked.
template <int BITS>
struct Unpack512 {
  __m512i idx, shift, mask;
  Unpack512() {
    alignas(64) uint8_t ib[64];
    alignas(64) uint16_t sb[32];
    for (int w = 0; w < 32; ++w) {
      ib[2 * w] = static_cast<uint8_t>((w * BITS) >> 3);
      ib[2 * w + 1] = static_cast<uint8_t>(((w * BITS) >> 3) + 1);
      sb[w] = static_cast<uint16_t>((w * BITS) & 7);
    }
    idx = _mm512_load_si512(ib);
    shift = _mm512_load_si512(sb);
    mask = _mm512_set1_epi16((1 << BITS) - 1);
  }
};

template <int BITS>
inline void unpack512(const uint8_t* __restrict p, int64_t D, float* __restrict out) {
  static const Unpack512<BITS> u;
  const __mmask64 m = (1ULL << (4 * BITS)) - 1;    // 32 codes = 4 * BITS bytes
  for (int64_t c0 = 0; c0 < D; c0 += 32) {
    __m512i bytes = _mm512_maskz_loadu_epi8(m, p + c0 * BITS / 8);
    __m512i w = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(u.idx, bytes), u.shift), u.mask);
    _mm512_storeu_ps(out + c0, _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w))));
    _mm512_storeu_ps(out + c0 + 16, _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1))));
  }
}
#endif

// codes of one token as floats (exact small integers): out[D]
template <int BITS>
inline void unpack(const uint8_t* __restrict p, int64_t D, float* __restrict out) {
#ifdef MIKV_AVX512_UNPACK
  if constexpr (BITS != 8) {
    if (D % 32 == 0) return unpack512<BITS>(p, D, out);
  }
#endif
  if constexpr (BITS == 8) {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<float>(p[d]);
  } else {
    const float* __restrict tab = code_table(BITS);
    for (int64_t c = 0; c < D / 8; ++c) {
      const uint8_t* b = p + c * BITS;
      float* o = out + c * 8;
      const float* t0 = tab + (0 * 256 + b[0]) * 8;
      for (int j = 0; j < 8; ++j) o[j] = t0[j];
      for (int m = 1; m < BITS; ++m) {
        const float* tm = tab + (m * 256 + b[m]) * 8;
        for (int j = 0; j < 8; ++j) o[j] += tm[j];
      }
    }
  }
}

// ------------------------------------------------------------------------ group metadata
// A token's (scale, zero) records in a page's s/z array (Layout::group_meta): fp16 (scale, zero)
// pairs, 4 B each; or fp8-scale (core.quant.pack_meta), 3 B each: the zero's fp16 bytes
// (little-endian), then the scale's high byte (the scale is an e5m2 value, the high byte of its fp16).
inline void read_meta(const uint8_t* __restrict sz, int64_t i, bool fp8, float& s, float& z) {
  if (fp8) {
    const uint8_t* r = sz + 3 * i;
    z = half_to_float(static_cast<uint16_t>(r[0] | (r[1] << 8)));
    s = half_to_float(static_cast<uint16_t>(r[2] << 8));
  } else {
    uint16_t h[2];
    std::memcpy(h, sz + 4 * i, sizeof(h));
    s = half_to_float(h[0]);
    z = half_to_float(h[1]);
  }
}

inline void write_meta(uint8_t* __restrict sz, int64_t i, bool fp8, uint16_t scale, uint16_t zero) {
  if (fp8) {
    uint8_t* r = sz + 3 * i;
    r[0] = static_cast<uint8_t>(zero & 0xff);
    r[1] = static_cast<uint8_t>(zero >> 8);
    r[2] = static_cast<uint8_t>(scale >> 8);
  } else {
    const uint16_t h[2] = {scale, zero};
    std::memcpy(sz + 4 * i, h, sizeof(h));
  }
}

// Smallest fp8 e5m2 value >= an fp16 scale >= 0 (core.quant.e5m2_round_up): the low byte cleared,
// carrying up when it was not 0.
inline uint16_t e5m2_round_up(uint16_t h) { return static_cast<uint16_t>((h + 0xFF) & 0x7F00); }

// x_hat = zero + code * scale per group (fp32), from packed codes and the token's s/z records.
template <int BITS>
inline void dequant(const uint8_t* __restrict p, const uint8_t* __restrict sz, bool fp8, int64_t D, int64_t group,
                    float* __restrict out) {
  unpack<BITS>(p, D, out);
  for (int64_t g0 = 0, gi = 0; g0 < D; g0 += group, ++gi) {
    float s, z;
    read_meta(sz, gi, fp8, s, z);
    for (int64_t d = g0; d < g0 + group; ++d) out[d] = z + out[d] * s;
  }
}

// Quantize one token x[D] (core.quant.quantize): packed codes -> p, its s/z records -> sz (fp8: the
// scale rounded up to e5m2 before the codes are computed from it). Non-finite elements are quantized
// as finite_for_lo makes them: every code and (scale, zero) is defined and finite.
void quantize_token(const float* x_in, int64_t D, int64_t bits, int64_t group, bool fp8, uint8_t* p, uint8_t* sz,
                    uint8_t* codes /* scratch [D] */) {
  const float qmax = static_cast<float>((1 << bits) - 1);
#ifdef __AVX512F__
  const bool lanes = group % 16 == 0;   // 16 lanes at a time: the same arithmetic per element
#endif
  for (int64_t g0 = 0, gi = 0; g0 < D; g0 += group, ++gi) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
#ifdef __AVX512F__
    if (lanes) {
      __m512 vmn = _mm512_set1_ps(mn), vmx = _mm512_set1_ps(mx);
      for (int64_t d = g0; d < g0 + group; d += 16) {
        const __m512 x = finite_for_lo512(_mm512_loadu_ps(x_in + d));
        vmn = _mm512_min_ps(vmn, x);
        vmx = _mm512_max_ps(vmx, x);
      }
      mn = _mm512_reduce_min_ps(vmn);
      mx = _mm512_reduce_max_ps(vmx);
    } else
#endif
    for (int64_t d = g0; d < g0 + group; ++d) {
      const float x = finite_for_lo(x_in[d]);
      mn = std::min(mn, x);
      mx = std::max(mx, x);
    }
    const uint16_t zh = fp16_round_down(mn);
    const float z = half_to_float(zh);
    const float sc = std::min(std::max((mx - z) / qmax, -65504.f), 65504.f);
    const uint16_t sh = fp8 ? e5m2_round_up(fp16_round_up(sc)) : fp16_round_up(sc);
    const float s = half_to_float(sh);
    write_meta(sz, gi, fp8, sh, zh);
#ifdef __AVX512F__
    if (lanes) {
      const __m512 vz = _mm512_set1_ps(z), vs = _mm512_set1_ps(s), half = _mm512_set1_ps(0.5f),
                   top = _mm512_set1_ps(qmax);
      for (int64_t d = g0; d < g0 + group; d += 16) {
        const __m512 x = finite_for_lo512(_mm512_loadu_ps(x_in + d));
        const __m512 t = s > 0.f ? _mm512_div_ps(_mm512_sub_ps(x, vz), vs) : _mm512_setzero_ps();
        __m512 c = _mm512_roundscale_ps(_mm512_add_ps(t, half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        c = _mm512_min_ps(_mm512_max_ps(c, _mm512_setzero_ps()), top);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + d), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(c)));
      }
      continue;
    }
#endif
    for (int64_t d = g0; d < g0 + group; ++d) {
      const float x = finite_for_lo(x_in[d]);
      float t = s > 0.f ? (x - z) / s : 0.f;
      float c = std::floor(t + 0.5f);
      c = std::min(std::max(c, 0.f), qmax);
      codes[d] = static_cast<uint8_t>(c);
    }
  }
  if (bits == 8) {
    std::memcpy(p, codes, D);
    return;
  }
  if (bits == 4) {   // byte i: codes 2i (low nibble), 2i + 1 (the same bit stream, written bytewise)
    for (int64_t i = 0; i < D / 2; ++i) p[i] = static_cast<uint8_t>(codes[2 * i] | (codes[2 * i + 1] << 4));
    return;
  }
  for (int64_t c = 0; c < D / 8; ++c) {
    uint32_t w = 0;
    for (int j = 0; j < 8; ++j) w |= static_cast<uint32_t>(codes[c * 8 + j]) << (j * bits);
    for (int m = 0; m < bits; ++m) p[c * bits + m] = static_cast<uint8_t>((w >> (8 * m)) & 0xff);
  }
}

}  // namespace
