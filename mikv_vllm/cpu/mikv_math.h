// fp32 math of the attention: dot products (one and several rows), exp for softmax arguments <= 0
// (AVX-512: 16 lanes at a time), the softmax of one row. Lane-parallel, so they vectorise without reassociation flags.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

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

#ifdef __AVX512F__
// exp(x) for x <= 0 in 16 lanes (exp_nonpos, vectorised: same polynomial; x < -87 -> 0, NaN stays NaN).
inline __m512 exp_nonpos512(__m512 x) {
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const __m512 v = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NLT_UQ), v);
}

#endif

// x[k] = exp(x[k] - mx) for k < n (x[k] <= mx); returns their sum (AVX-512: 16 lanes, else lane-parallel).
inline float exp_shift_sum(float* __restrict x, int64_t n, float mx) {
  int64_t k = 0;
#ifdef __AVX512F__
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sv = _mm512_setzero_ps();
  for (; k + 16 <= n; k += 16) {
    const __m512 e = exp_nonpos512(_mm512_sub_ps(_mm512_loadu_ps(x + k), m));
    _mm512_storeu_ps(x + k, e);
    sv = _mm512_add_ps(sv, e);
  }
  if (k < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - k)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpos512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + k), m)));
    _mm512_mask_storeu_ps(x + k, tail, e);
    sv = _mm512_add_ps(sv, e);
  }
  return _mm512_reduce_add_ps(sv);
#else
  constexpr int L = 16;
  for (int64_t j = 0; j < n; ++j) x[j] = exp_nonpos(x[j] - mx);
  float s[L] = {0};
  for (; k + L <= n; k += L)
    for (int i = 0; i < L; ++i) s[i] += x[k + i];
  float r = 0.f;
  for (; k < n; ++k) r += x[k];
  for (int i = 0; i < L; ++i) r += s[i];
  return r;
#endif
}

// max of x[0..n), lane-parallel (vectorises without reassociation flags)
inline float lane_max(const float* __restrict x, int64_t n, float init) {
  constexpr int L = 16;
  float m[L];
  for (int i = 0; i < L; ++i) m[i] = init;
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int i = 0; i < L; ++i) m[i] = x[k + i] > m[i] ? x[k + i] : m[i];
  float r = init;
  for (; k < n; ++k) r = std::max(r, x[k]);
  for (int i = 0; i < L; ++i) r = std::max(r, m[i]);
  return r;
}

// In place: l[0..S) -> softmax(l) (max, exp, 1/sum), lane-parallel reductions.
inline void softmax_row(float* __restrict l, int64_t S) {
  const float inv = 1.f / exp_shift_sum(l, S, lane_max(l, S, -std::numeric_limits<float>::infinity()));
  for (int64_t t = 0; t < S; ++t) l[t] *= inv;
}

}  // namespace
