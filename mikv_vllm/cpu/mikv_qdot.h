// Attention on the packed codes (the C++ decode op): every lo token's codes are unpacked to bytes
// once, then used by all G query heads of its KV head.
//   QK: logit = sum_k [ s_k * (c_k . q_k) + z_k * sum(q_k) ] over the quantization groups k, q the
//       query pre-divided by the balancer. Two modes (env MIKV_CPU_QK, default fp32; an env switch,
//       not a config field, because it selects a kernel arithmetic, not a page format or policy,
//       and the torch / Triton op sets have only the exact form): "int8" quantizes q per head to
//       int8 (symmetric, amax / 127, round to nearest even) and takes c_k . q_k as integer dot
//       products (AVX-512 VNNI vpdpbusd, AVX2 maddubs, scalar); sum(q_k) stays exact fp32. "fp32"
//       takes c_k . q_k in fp32: the reference's logits up to fp32 rounding (the exact path).
//   PV: out = sum_t (p_t s_t) c_t + sum_t p_t z_t per group: the scale folded into the weight, the
//       zero point summed apart (exact up to fp32 rounding in both modes).
// SIMD paths are chosen at compile time: AVX-512 (VNNI + BW), AVX2, scalar.
#pragma once
#include <cstdlib>

#include "mikv_codes.h"
#include "mikv_math.h"
#include "mikv_select.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define MIKV_QDOT_AVX512 1
#endif

namespace {

// ------------------------------------------------------------------------------------ the mode
constexpr const char* kQkEnv = "MIKV_CPU_QK";
// Default: the exact fp32 path. The int8 path is not the default until a quality check of the
// engine with it (benchmarks/ppl_probe.py, `mikv-vllm eval --configs mikv`) has been run; on the
// structured test data of tests/cpu it moves outputs by up to ~0.2 (test_cpu_qdot.py).
constexpr bool kQkInt8Default = false;

// true: int8 q (integer dot products); false: fp32 (exact). Read at every call; a bad value raises.
inline bool qk_int8() {
  const char* e = std::getenv(kQkEnv);
  if (e == nullptr || *e == '\0') return kQkInt8Default;
  if (std::strcmp(e, "int8") == 0) return true;
  if (std::strcmp(e, "fp32") == 0) return false;
  TORCH_CHECK(false, "mikv_cpu: ", kQkEnv, " must be 'int8' or 'fp32', got '", e, "'");
  return kQkInt8Default;
}

// ------------------------------------------------------------------------------- codes to bytes
// Codes of one token as bytes (0 .. 2^BITS - 1): out[D].
template <int BITS>
inline void unpack_u8(const uint8_t* __restrict p, int64_t D, uint8_t* __restrict out) {
  if constexpr (BITS == 8) {
    std::memcpy(out, p, D);
    return;
  }
  int64_t d = 0;
  if constexpr (BITS == 4) {   // byte b holds codes 2b (low nibble) and 2b + 1 (high nibble)
#if defined(__AVX512BW__)
    const __m512i lo = _mm512_set1_epi16(0x000f), hi = _mm512_set1_epi16(0x0f00);
    for (; d + 64 <= D; d += 64) {
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + d / 2)));
      _mm512_storeu_si512(out + d, _mm512_or_si512(_mm512_and_si512(w, lo),
                                                   _mm512_and_si512(_mm512_slli_epi16(w, 4), hi)));
    }
#elif defined(__AVX2__)
    const __m256i lo = _mm256_set1_epi16(0x000f), hi = _mm256_set1_epi16(0x0f00);
    for (; d + 32 <= D; d += 32) {
      const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + d / 2)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d),
                          _mm256_or_si256(_mm256_and_si256(w, lo), _mm256_and_si256(_mm256_slli_epi16(w, 4), hi)));
    }
#endif
  }
#ifdef MIKV_AVX512_UNPACK
  if constexpr (BITS == 2 || BITS == 3) {
    static const Unpack512<BITS> u;
    const __mmask64 m = (1ULL << (4 * BITS)) - 1;   // 32 codes = 4 * BITS bytes
    for (; d + 32 <= D; d += 32) {
      const __m512i bytes = _mm512_maskz_loadu_epi8(m, p + d * BITS / 8);
      const __m512i w = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(u.idx, bytes), u.shift), u.mask);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + d), _mm512_cvtepi16_epi8(w));
    }
  }
#endif
  for (; d < D; d += 8) {   // 8 codes in BITS bytes (little-endian bit stream)
    uint32_t w = 0;
    for (int m = 0; m < BITS; ++m) w |= static_cast<uint32_t>(p[d * BITS / 8 + m]) << (8 * m);
    for (int j = 0; j < 8; ++j) out[d + j] = static_cast<uint8_t>((w >> (j * BITS)) & ((1u << BITS) - 1));
  }
}

// --------------------------------------------------------------------------- the query, prepared
// Per query head g: ql = q * scale / b (lo keys), the exact group sums of ql, and (int8 mode) ql
// quantized: qi = round(ql * (127 / amax)), amax = max |ql|, dequantized by qa = amax / 127.
struct QueryLo {
  std::vector<float> ql, qsum, qa;   // [G, D], [G, NG], [G]
  std::vector<int8_t> qi;            // [G, D] (int8 mode)
};

inline void prepare_query(const float* qs, const float* bal, int64_t G, int64_t D, int64_t group, bool int8,
                          QueryLo& Q) {
  const int64_t NG = D / group;
  Q.ql.resize(G * D);
  Q.qsum.assign(G * NG, 0.f);
  Q.qa.assign(G, 0.f);
  Q.qi.resize(G * D);
  for (int64_t g = 0; g < G; ++g) {
    float* ql = Q.ql.data() + g * D;
    float amax = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      ql[d] = qs[g * D + d] / bal[d];
      Q.qsum[g * NG + d / group] += ql[d];
      amax = std::max(amax, std::fabs(ql[d]));
    }
    if (!int8) continue;
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    Q.qa[g] = amax / 127.f;
    for (int64_t d = 0; d < D; ++d)
      Q.qi[g * D + d] = static_cast<int8_t>(std::min(std::max(std::nearbyint(ql[d] * inv), -127.f), 127.f));
  }
}

// ------------------------------------------------------------------------------- dot products
// sum of c[i] * q[i] for i < n (codes c < 2^BITS, so maddubs' 16-bit pair sums cannot saturate for BITS <= 6)
template <int BITS>
inline int32_t dot_u8s8(const uint8_t* __restrict c, const int8_t* __restrict q, int64_t n) {
  int64_t i = 0;
  int32_t s = 0;
#if defined(MIKV_QDOT_AVX512)
  if (n >= 64) {
    __m512i acc = _mm512_setzero_si512();
    for (; i + 64 <= n; i += 64) acc = _mm512_dpbusd_epi32(acc, _mm512_loadu_si512(c + i), _mm512_loadu_si512(q + i));
    s = _mm512_reduce_add_epi32(acc);
  }
#elif defined(__AVX2__)
  if constexpr (BITS <= 6) {
    __m256i acc = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    for (; i + 32 <= n; i += 32) {
      const __m256i pr = _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + i)),
                                              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pr, ones));
    }
    alignas(32) int32_t l[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(l), acc);
    for (int j = 0; j < 8; ++j) s += l[j];
  }
#endif
  for (; i < n; ++i) s += static_cast<int32_t>(c[i]) * static_cast<int32_t>(q[i]);
  return s;
}

#ifdef MIKV_QDOT_AVX512
// Lane i of the result = the sum of the lanes of v[i] (pairwise transposing adds; v is clobbered).
template <class V, class Perm, class Add>
inline V hsum16(V* v, Perm perm, Add add) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int n = 16; n > 1; n /= 2)
    for (int i = 0; i < n / 2; ++i) v[i] = add(perm(v[2 * i], ev, v[2 * i + 1]), perm(v[2 * i], od, v[2 * i + 1]));
  return v[0];
}

// dots of 16 tokens (byte rows cu[i * D ..]) with q over channels [c0, c0 + len), len % 64 == 0
inline __m512 tile_dot_s8(const uint8_t* cu, int64_t D, const int8_t* q, int64_t c0, int64_t len) {
  __m512i acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
  for (int64_t c = c0; c < c0 + len; c += 64) {
    const __m512i qv = _mm512_loadu_si512(q + c);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512(cu + i * D + c), qv);
  }
  return _mm512_cvtepi32_ps(hsum16(acc, [](__m512i a, __m512i i, __m512i b) { return _mm512_permutex2var_epi32(a, i, b); },
                                   [](__m512i a, __m512i b) { return _mm512_add_epi32(a, b); }));
}

// the same in fp32 over float rows cf (len % 16 == 0)
inline __m512 tile_dot_f32(const float* cf, int64_t D, const float* q, int64_t c0, int64_t len) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t c = c0; c < c0 + len; c += 16) {
    const __m512 qv = _mm512_loadu_ps(q + c);
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(cf + i * D + c), qv, acc[i]);
  }
  return hsum16(acc, [](__m512 a, __m512i i, __m512 b) { return _mm512_permutex2var_ps(a, i, b); },
                [](__m512 a, __m512 b) { return _mm512_add_ps(a, b); });
}
#endif

// --------------------------------------------------------------------------------- a tile of keys
constexpr int kTile = 16;   // lo tokens per tile

// Codes (bytes, and as floats in fp32 mode) and the fp32 (scale, zero) of up to kTile tokens.
struct CodeTile {
  std::vector<uint8_t> cu;   // [kTile, D]
  std::vector<float> cf;     // [kTile, D] (fp32 mode)
  std::vector<float> s, z;   // [NG, kTile]
  void resize(int64_t D, int64_t NG) {
    if (static_cast<int64_t>(cu.size()) != kTile * D) {
      cu.assign(kTile * D, 0);
      cf.assign(kTile * D, 0.f);
    }
    s.assign(NG * kTile, 0.f);
    z.assign(NG * kTile, 0.f);
  }
};

// Unpack tokens [0, n) of a tile: packed codes at p (P bytes each), their s/z records at sz (NG per
// token, in the format fp8 says: read_meta).
template <int BITS>
inline void load_code_tile(const uint8_t* p, const uint8_t* sz, bool fp8, int64_t n, int64_t D, int64_t P,
                           int64_t NG, bool with_floats, CodeTile& T) {
  for (int64_t i = 0; i < n; ++i) {
    uint8_t* cu = T.cu.data() + i * D;
    unpack_u8<BITS>(p + i * P, D, cu);
    if (with_floats)
      for (int64_t d = 0; d < D; ++d) T.cf[i * D + d] = static_cast<float>(cu[d]);
    for (int64_t k = 0; k < NG; ++k) read_meta(sz, i * NG + k, fp8, T.s[k * kTile + i], T.z[k * kTile + i]);
  }
}

// lg[g * ld + i] = logit of query head g and tile token i < n (see the file comment).
template <int BITS>
inline void tile_logits(const CodeTile& T, const QueryLo& Q, int64_t n, int64_t G, int64_t D, int64_t group,
                        bool int8, float* lg, int64_t ld) {
  const int64_t NG = D / group;
#ifdef MIKV_QDOT_AVX512
  if (group % (int8 ? 64 : 16) == 0) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    for (int64_t g = 0; g < G; ++g) {
      __m512 l = _mm512_setzero_ps();
      for (int64_t k = 0; k < NG; ++k) {
        const __m512 s = _mm512_loadu_ps(T.s.data() + k * kTile), z = _mm512_loadu_ps(T.z.data() + k * kTile);
        const __m512 dk = int8 ? _mm512_mul_ps(_mm512_set1_ps(Q.qa[g]), tile_dot_s8(T.cu.data(), D, Q.qi.data() + g * D, k * group, group))
                               : tile_dot_f32(T.cf.data(), D, Q.ql.data() + g * D, k * group, group);
        l = _mm512_fmadd_ps(s, dk, _mm512_fmadd_ps(z, _mm512_set1_ps(Q.qsum[g * NG + k]), l));
      }
      _mm512_mask_storeu_ps(lg + g * ld, m, l);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < G; ++g) {
      float l = 0.f;
      for (int64_t k = 0; k < NG; ++k) {
        const int64_t c0 = k * group;
        const float dk = int8 ? Q.qa[g] * static_cast<float>(dot_u8s8<BITS>(T.cu.data() + i * D + c0, Q.qi.data() + g * D + c0, group))
                              : dot(T.cf.data() + i * D + c0, Q.ql.data() + g * D + c0, group);
        l += T.s[k * kTile + i] * dk + T.z[k * kTile + i] * Q.qsum[g * NG + k];
      }
      lg[g * ld + i] = l;
    }
}

// P.V of tile tokens [0, n): acc[g, d] += (p[g, i] s_k) c_i[d], zacc[g, k] += p[g, i] z_k (p[g * ldp + i]).
// GT / DT > 0: the fixed shapes (AVX-512 accumulators in registers are the caller's; here memory).
inline void tile_pv(const CodeTile& T, const float* p, int64_t ldp, int64_t n, int64_t G, int64_t D, int64_t group,
                    float* __restrict acc, float* __restrict zacc) {
  const int64_t NG = D / group;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* cu = T.cu.data() + i * D;
    for (int64_t g = 0; g < G; ++g) {
      const float pg = p[g * ldp + i];
      float* ag = acc + g * D;
      for (int64_t k = 0; k < NG; ++k) {
        const float w = pg * T.s[k * kTile + i];
        zacc[g * NG + k] += pg * T.z[k * kTile + i];
        for (int64_t d = k * group; d < (k + 1) * group; ++d) ag[d] += w * static_cast<float>(cu[d]);
      }
    }
  }
}

#ifdef MIKV_QDOT_AVX512
// tile_pv for the fixed shapes with one group per 16 channels or more: accumulators in registers.
template <int GT, int DT>
inline void tile_pv_fixed(const CodeTile& T, const float* p, int64_t ldp, int64_t n, int64_t group,
                          __m512 (&acc)[GT][DT / 16], float* __restrict zacc) {
  constexpr int NV = DT / 16;
  const int64_t NG = DT / group;
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* cu = T.cu.data() + i * DT;
    __m512 cv[NV];
    for (int j = 0; j < NV; ++j)
      cv[j] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cu + 16 * j))));
    for (int g = 0; g < GT; ++g) {
      const float pg = p[g * ldp + i];
      for (int64_t k = 0; k < NG; ++k) zacc[g * NG + k] += pg * T.z[k * kTile + i];
      for (int j = 0; j < NV; ++j) {
        const __m512 w = _mm512_set1_ps(pg * T.s[(16 * j / group) * kTile + i]);
        acc[g][j] = _mm512_fmadd_ps(w, cv[j], acc[g][j]);
      }
    }
  }
}
#endif

}  // namespace
