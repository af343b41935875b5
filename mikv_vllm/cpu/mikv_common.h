// Shared pieces of the MiKV C++ CPU ops: the page layout, fp16/bf16 conversions, INT2/3/4/8 codes
// (pack, unpack, dequantize, quantize a token), dot products, softmax, hi-copy loads and stores, the
// balancer, and the hi-set selection (budget, candidate priority, losers, slot scores, promotion).
// Header-only (internal linkage): every op source includes it.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define MIKV_AVX512_UNPACK 1
#endif

namespace {


// Page layout (byte offsets inside one (block, KV head) region), see core/layout.py:
// [K_lo N*Pk][V_lo N*Pv][K s/z][V s/z][tag R i32][score R f32][K_hi R*D][V_hi R*D][balancer D fp16][pad].
// `score` holds one fp32 per hi slot (the accumulated mass of the slot's token, meaningful while the
// slot's tag is set), not one per position.
struct Layout {
  int64_t N, D, bits, group, R, region_bytes;
  int64_t k_lo, v_lo, k_sz, v_sz, score, tag, k_hi, v_hi, balancer;
  int64_t hi_dtype;     // 0 fp16, 1 bf16, 2 fp32, 3 fp8 e4m3fn
  int64_t score_dtype;  // 0 fp32 (the only score dtype; config.SCORE_DTYPES)
  int64_t has_bal;
  int64_t packed() const { return D * bits / 8; }
  int64_t groups() const { return bits ? D / group : 0; }
  int64_t hi_elem() const { return hi_dtype == 2 ? 4 : hi_dtype == 3 ? 1 : 2; }  // bytes of one hi element
};

constexpr int kMetaLen = 18;

// Every sub-array of the meta lies inside the region, so no tag, slot, code or header read through a
// valid block id can leave its region (the ops trust these offsets in their inner loops).
inline void check_layout_extents(const Layout& l) {
  TORCH_CHECK(l.N > 0 && l.D > 0 && l.R >= 0 && l.R <= l.N && l.region_bytes > 0 && (l.bits == 0 || l.group > 0),
              "mikv_cpu: bad layout meta (block ", l.N, ", head_dim ", l.D, ", slots ", l.R, ", group ", l.group,
              ", region ", l.region_bytes, " bytes)");
  const int64_t hi = l.D * (l.hi_dtype == 2 ? 4 : l.hi_dtype == 3 ? 1 : 2);
  const int64_t sz = l.bits ? l.N * (l.D / l.group) * 4 : 0;
  const struct { const char* name; int64_t off, bytes; } parts[] = {
      {"k_lo", l.k_lo, l.N * l.D * l.bits / 8}, {"v_lo", l.v_lo, l.N * l.D * l.bits / 8}, {"k_sz", l.k_sz, sz},
      {"v_sz", l.v_sz, sz}, {"tag", l.tag, l.R * 4}, {"score", l.score, l.R * 4}, {"k_hi", l.k_hi, l.R * hi},
      {"v_hi", l.v_hi, l.R * hi}, {"balancer", l.balancer, l.has_bal ? l.D * 2 : 0}};
  for (const auto& p : parts)
    TORCH_CHECK(p.bytes == 0 || (p.off >= 0 && p.off + p.bytes <= l.region_bytes),
                "mikv_cpu: layout meta puts ", p.name, " (", p.bytes, " bytes at offset ", p.off,
                ") outside the region of ", l.region_bytes, " bytes");
}

Layout parse_layout(const std::vector<int64_t>& m) {
  TORCH_CHECK(static_cast<int>(m.size()) == kMetaLen, "mikv_cpu: layout meta needs ", kMetaLen, " entries");
  Layout l{m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11], m[12], m[13], m[14],
           m[15], m[16], m[17]};
  TORCH_CHECK(l.bits == 0 || l.bits == 2 || l.bits == 3 || l.bits == 4 || l.bits == 8, "mikv_cpu: bits ", l.bits);
  TORCH_CHECK(l.bits == 0 || (l.D % 8 == 0 && l.D % l.group == 0), "mikv_cpu: D ", l.D, " group ", l.group);
  TORCH_CHECK(l.hi_dtype >= 0 && l.hi_dtype <= 3, "mikv_cpu: hi dtype code ", l.hi_dtype);
  TORCH_CHECK(l.score_dtype == 0, "mikv_cpu: score dtype code ", l.score_dtype, " (only float32 scores, code 0)");
  TORCH_CHECK(l.region_bytes % 4 == 0, "mikv_cpu: region of ", l.region_bytes,
              " bytes: the fp32 / int32 sub-arrays of every region must stay 4-byte aligned");
  check_layout_extents(l);
  return l;
}

// The per-slot sub-arrays of one region: R tags (position + 1, 0 = empty) and R fp32 scores.
inline int32_t* slot_tags(const Layout& L, uint8_t* reg) { return reinterpret_cast<int32_t*>(reg + L.tag); }
inline float* slot_scores(const Layout& L, uint8_t* reg) { return reinterpret_cast<float*>(reg + L.score); }

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

// x_hat = zero + code * scale per group (fp32), from packed codes and fp16 (scale, zero) pairs.
template <int BITS>
inline void dequant(const uint8_t* __restrict p, const uint16_t* __restrict sz, int64_t D, int64_t group,
                    float* __restrict out) {
  unpack<BITS>(p, D, out);
  for (int64_t g0 = 0, gi = 0; g0 < D; g0 += group, ++gi) {
    const float s = half_to_float(sz[2 * gi]), z = half_to_float(sz[2 * gi + 1]);
    for (int64_t d = g0; d < g0 + group; ++d) out[d] = z + out[d] * s;
  }
}

// Lane-parallel dot product (vectorises without reassociation flags).
inline float dot(const float* __restrict a, const float* __restrict b, int64_t D) {
  constexpr int L = 16;
  float acc[L] = {0};
  int64_t d = 0;
  for (; d + L <= D; d += L)
    for (int l = 0; l < L; ++l) acc[l] += a[d + l] * b[d + l];
  float s = 0.f;
  for (; d < D; ++d) s += a[d] * b[d];
  for (int l = 0; l < L; ++l) s += acc[l];
  return s;
}

// out[g] = a[g, :] . x for g < G (a row-major [G, D]); lane-parallel, x read once per lane block.
// GT > 0: G is the compile-time constant GT.
template <int GT>
inline void dots(const float* __restrict a, int64_t G_rt, const float* __restrict x, int64_t D, float* __restrict out,
                 int64_t out_stride) {
  constexpr int L = 16;
  const int64_t G = GT > 0 ? GT : G_rt;
#ifdef __AVX512F__
  if (G <= 8 && D % L == 0) {
    __m512 acc[8];
    for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += L) {
      const __m512 xv = _mm512_loadu_ps(x + d);
      for (int64_t g = 0; g < G; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(a + g * D + d), xv, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) out[g * out_stride] = _mm512_reduce_add_ps(acc[g]);
    return;
  }
#endif
  if (G <= 8 && D % L == 0) {
    float acc[8][L];
    for (int64_t g = 0; g < G; ++g)
      for (int l = 0; l < L; ++l) acc[g][l] = 0.f;
    for (int64_t d = 0; d < D; d += L)
      for (int64_t g = 0; g < G; ++g)
        for (int l = 0; l < L; ++l) acc[g][l] += a[g * D + d + l] * x[d + l];
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int l = 0; l < L; ++l) s += acc[g][l];
      out[g * out_stride] = s;
    }
    return;
  }
  for (int64_t g = 0; g < G; ++g) out[g * out_stride] = dot(a + g * D, x, D);
}

// exp(x) for softmax arguments x <= 0 (Cephes expf polynomial, rel. error ~2e-7); x < -87 -> 0
// (exp(-inf) = 0 exactly). Branch-free, so loops over it vectorise.
inline float exp_nonpos(float x) {
  const float xc = std::max(x, -87.f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return x < -87.f ? 0.f : y * scale;
}

// In place: l[0..S) -> softmax(l) (max, exp, 1/sum), lane-parallel reductions.
inline void softmax_row(float* __restrict l, int64_t S) {
  constexpr int L = 16;
  float mx[L], sm[L];
  for (int i = 0; i < L; ++i) {
    mx[i] = -std::numeric_limits<float>::infinity();
    sm[i] = 0.f;
  }
  int64_t t = 0;
  for (; t + L <= S; t += L)
    for (int i = 0; i < L; ++i) mx[i] = l[t + i] > mx[i] ? l[t + i] : mx[i];
  float m = -std::numeric_limits<float>::infinity();
  for (; t < S; ++t) m = std::max(m, l[t]);
  for (int i = 0; i < L; ++i) m = std::max(m, mx[i]);
  t = 0;
  for (; t + L <= S; t += L)
    for (int i = 0; i < L; ++i) {
      const float e = exp_nonpos(l[t + i] - m);
      l[t + i] = e;
      sm[i] += e;
    }
  float sum = 0.f;
  for (; t < S; ++t) {
    l[t] = exp_nonpos(l[t] - m);
    sum += l[t];
  }
  for (int i = 0; i < L; ++i) sum += sm[i];
  const float inv = 1.f / sum;
  for (t = 0; t < S; ++t) l[t] *= inv;
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

// Quantize one token x[D] (core.quant.quantize): packed codes -> p, fp16 (scale, zero) -> sz. Non-finite
// elements are quantized as finite_for_lo makes them: every code and (scale, zero) is defined and finite.
void quantize_token(const float* x_in, int64_t D, int64_t bits, int64_t group, uint8_t* p, uint16_t* sz,
                    uint8_t* codes /* scratch [D] */) {
  const float qmax = static_cast<float>((1 << bits) - 1);
  for (int64_t g0 = 0, gi = 0; g0 < D; g0 += group, ++gi) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn;
    for (int64_t d = g0; d < g0 + group; ++d) {
      const float x = finite_for_lo(x_in[d]);
      mn = std::min(mn, x);
      mx = std::max(mx, x);
    }
    const uint16_t zh = fp16_round_down(mn);
    const float z = half_to_float(zh);
    const float sc = std::min(std::max((mx - z) / qmax, -65504.f), 65504.f);
    const uint16_t sh = fp16_round_up(sc);
    const float s = half_to_float(sh);
    sz[2 * gi] = sh;
    sz[2 * gi + 1] = zh;
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
  for (int64_t c = 0; c < D / 8; ++c) {
    uint32_t w = 0;
    for (int j = 0; j < 8; ++j) w |= static_cast<uint32_t>(codes[c * 8 + j]) << (j * bits);
    for (int m = 0; m < bits; ++m) p[c * bits + m] = static_cast<uint8_t>((w >> (8 * m)) & 0xff);
  }
}


// Balancer of one KV head (core.balancer.compute_balancer, then to_storage) into the page's fp16 header
// bs[D]: b[d] = sqrt(max|q| / max|k|) over n tokens, the max over the G query heads of the group too
// (query head g of token t at q[t * q_stride + g * D + d], the key at k[t * k_stride + d]). A NaN makes
// its max NaN (as torch's amax); where either max is 0 or not finite b = 1; clamped to [2^-14, 2^14].
inline void balancer_to_storage(const float* q, int64_t q_stride, int64_t G, const float* k, int64_t k_stride,
                                int64_t n, int64_t D, uint16_t* bs) {
  for (int64_t d = 0; d < D; ++d) {
    float qm = 0.f, km = 0.f;
    bool qnan = false, knan = false;
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t g = 0; g < G; ++g) {
        const float a = std::fabs(q[t * q_stride + g * D + d]);
        if (std::isnan(a)) qnan = true;
        qm = std::max(qm, a);
      }
      const float a = std::fabs(k[t * k_stride + d]);
      if (std::isnan(a)) knan = true;
      km = std::max(km, a);
    }
    if (qnan) qm = std::numeric_limits<float>::quiet_NaN();
    if (knan) km = std::numeric_limits<float>::quiet_NaN();
    const bool fine = qm > 0.f && km > 0.f && std::isfinite(qm) && std::isfinite(km);
    float b = std::sqrt(fine ? qm / km : 1.f);
    if (!(std::isfinite(b) && b > 0.f)) b = 1.f;
    b = std::min(std::max(b, 6.103515625e-05f), 16384.f);   // to_storage: clamp [2^-14, 2^14]
    bs[d] = float_to_half_bits(b);
  }
}

// ------------------------------------------------------------------------------- hi-set selection
// core.importance.select_hi for one (request, KV head). Parameters (MiKVConfig): hi_ratio r,
// sink_tokens S, recent_window W (-1: half the budget).
struct Selection {
  double ratio;
  int64_t sinks, window;
};

// The selection parameters as MiKVConfig.validate allows them (a NaN / inf ratio would reach a float ->
// int64 cast in hi_budget, which is undefined): checked once per op call.
inline Selection checked_selection(double ratio, int64_t sinks, int64_t window) {
  TORCH_CHECK(std::isfinite(ratio) && ratio >= 0 && ratio <= 1 && sinks >= 0 && window >= -1,
              "mikv_cpu: selection parameters hi_ratio ", ratio, " sink_tokens ", sinks, " recent_window ", window);
  return Selection{ratio, sinks, window};
}

// core.importance.hi_budget: min(max(floor(r * L + 1e-9), min(S, L)) [r > 0], num_slots), >= 0.
inline int64_t hi_budget(const Selection& sel, int64_t length, int64_t num_slots) {
  volatile double rl = sel.ratio * static_cast<double>(length);   // no FMA contraction: as torch's float64
  const int64_t by_ratio = static_cast<int64_t>(std::floor(rl + 1e-9));
  const int64_t sinks = std::min(length, sel.sinks);
  const int64_t budget = sel.ratio > 0 ? std::max(by_ratio, sinks) : by_ratio;
  return std::max<int64_t>(std::min(budget, num_slots), 0);
}

// First position of the recent window of a request of `length` tokens (core.importance.recent_window).
inline int64_t recent_start(const Selection& sel, int64_t length, int64_t budget) {
  const int64_t window = sel.window >= 0 ? sel.window : budget / 2;
  return length - window;
}

// Priority of a hi candidate: tier, then the within-tier key (sinks: -position, recent: position,
// heavy: score as double, NaN = -inf), then position, then candidate index (the reference's stable
// sorts keep index order on full ties: tagged slots in slot order, then the new tokens). Higher
// ranks first.
constexpr int32_t kSink = 2, kRecent = 1, kHeavy = 0;
struct Cand {
  int32_t tier;
  double within;
  int64_t pos, idx;
};
inline bool ranks_before(const Cand& a, const Cand& b) {
  if (a.tier != b.tier) return a.tier > b.tier;
  if (a.within != b.within) return a.within > b.within;
  if (a.pos != b.pos) return a.pos > b.pos;
  return a.idx < b.idx;
}

// Candidate at position p with index idx and score (a tagged slot's score, or a new token's mass).
inline Cand make_cand(const Selection& sel, int64_t recent_from, int64_t p, int64_t idx, float score) {
  const int32_t tier = p < sel.sinks ? kSink : p >= recent_from ? kRecent : kHeavy;
  const double key = std::isnan(score) ? -std::numeric_limits<double>::infinity() : static_cast<double>(score);
  const double within = tier == kSink ? -static_cast<double>(p) : tier == kRecent ? static_cast<double>(p) : key;
  return Cand{tier, within, p, idx};
}

// lose(c) for every candidate outside the best `budget` (reorders cands). The usual decode step has
// exactly one loser (budget + 1 candidates): a linear scan for the lowest priority; more take a
// partial selection (nth_element: the first `budget` are then exactly the best, the order is total).
template <class Lose>
inline void select_losers(std::vector<Cand>& cands, int64_t budget, Lose&& lose) {
  const int64_t C = static_cast<int64_t>(cands.size());
  if (C <= budget) return;
  if (C == budget + 1) {
    const Cand* worst = &cands[0];
    for (int64_t i = 1; i < C; ++i)
      if (ranks_before(*worst, cands[i])) worst = &cands[i];
    lose(*worst);
    return;
  }
  std::nth_element(cands.begin(), cands.begin() + budget, cands.end(), ranks_before);
  for (int64_t i = budget; i < C; ++i) lose(cands[i]);
}

// accumulate_scores (reference): every hi slot of the owned columns [own_from, nb) whose tag is a
// context position (tag in (0, ctx]) gets the mass of that position (mass: position-indexed),
// saturating at FLT_MAX (NaN stays NaN). No other slot's score is touched.
template <class Region>
inline void accumulate_slot_scores(const Layout& L, const Region& region, int64_t own_from, int64_t nb, int64_t ctx,
                                   const float* mass) {
  const float top = std::numeric_limits<float>::max();
  for (int64_t j = own_from; j < nb; ++j) {
    const int32_t* tags = slot_tags(L, region(j));
    float* sc = slot_scores(L, region(j));
    for (int64_t r = 0; r < L.R; ++r) {
      const int32_t t = tags[r];
      if (t > 0 && t <= ctx) sc[r] = std::min(sc[r] + mass[t - 1], top);
    }
  }
}

// A new token promoted into slot r of region reg: its score (its mass of this step, clamped to
// FLT_MAX) and its raw K/V as hi copies (to_hi). The caller sets the tag.
inline void fill_slot(const Layout& L, uint8_t* reg, int64_t r, float score, const float* kn, const float* vn) {
  slot_scores(L, reg)[r] = score;
  const int64_t bytes = L.D * L.hi_elem();
  store_hi(reg + L.k_hi + r * bytes, L.hi_dtype, L.D, kn);
  store_hi(reg + L.v_hi + r * bytes, L.hi_dtype, L.D, vn);
}

// A new token's candidate score: its mass of this step clamped to FLT_MAX (reference.maintain_hi).
inline float new_token_score(float mass) { return std::min(mass, std::numeric_limits<float>::max()); }

}  // namespace
