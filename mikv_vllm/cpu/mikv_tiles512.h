// AVX-512 decode loops of the exact (fp32) mode for the fixed shapes (GT query heads per KV head,
// head_dim DT a multiple of 64, groups of a multiple of 16 channels): every lo token's codes are
// read once per tile of kTile tokens and used by the GT query heads, with no per-token reduction.
//   QK: tokens in lanes. The tile's codes are unpacked to bytes, then transposed (16 x 16 dwords per
//       64 channels) so that each channel is one vector of 16 tokens: logits of 16 tokens per
//       channel with one convert and GT FMAs, the group's scale and zero applied once per group
//       (s * (c . q) + z * sum(q), as mikv_qdot.h).
//   PV: channels in lanes, accumulators in registers: per token GT * DT/16 FMAs with the weight
//       p * s broadcast, the zero points summed apart per tile in token lanes.
// Same arithmetic as tile_logits / tile_pv up to fp32 summation order.
#pragma once
#include "mikv_qdot.h"

#if defined(MIKV_QDOT_AVX512)
#define MIKV_TILES512 1

namespace {

// r[i] = row i (16 dwords) -> r[c] = column c (lane i = row i's dword c).
inline void transpose16_epi32(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4a + b] now holds rows 4a..4a+3, dword b of each 128-bit lane: lanes of 4 rows per 128 bits
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0x88);        // lanes 0, 2 of rows 0-3 | of rows 4-7
    t[4 + i] = _mm512_shuffle_i32x4(r[i], r[4 + i], 0xdd);    // lanes 1, 3
    t[8 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_i32x4(r[8 + i], r[12 + i], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);             // column i      (lane 0)
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);         // column 8 + i  (lane 2)
    r[4 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0x88);    // column 4 + i  (lane 1)
    r[12 + i] = _mm512_shuffle_i32x4(t[4 + i], t[12 + i], 0xdd);   // column 12 + i (lane 3)
  }
}

// Logits of the tile's tokens (bytes T.cu [kTile, DT], records T.s / T.z [NG, kTile]) for the GT
// query heads: lg[g * ld + i] for i < n.
template <int GT, int DT>
inline void tile_logits512(const CodeTile& T, const QueryLo& Q, int64_t n, int64_t group, float* lg, int64_t ld) {
  const int64_t NG = DT / group;
  __m512 l[GT], dk[4][GT];   // a partial sum per byte of the dword (shorter sums, less rounding)
  for (int g = 0; g < GT; ++g) l[g] = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j)
    for (int g = 0; g < GT; ++g) dk[j][g] = _mm512_setzero_ps();
  const __m512i byte = _mm512_set1_epi32(0xff);
  for (int64_t c0 = 0; c0 < DT; c0 += 64) {
    __m512i r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(T.cu.data() + i * DT + c0);
    transpose16_epi32(r);
    for (int w = 0; w < 16; ++w) {   // dword w: channels c0 + 4w .. + 3, one byte each
      const int64_t c = c0 + 4 * w;
      for (int j = 0; j < 4; ++j) {
        const __m512i x = j == 0 ? _mm512_and_si512(r[w], byte)
                        : j == 3 ? _mm512_srli_epi32(r[w], 24)
                                 : _mm512_and_si512(_mm512_srli_epi32(r[w], 8 * j), byte);
        const __m512 cf = _mm512_cvtepi32_ps(x);
        for (int g = 0; g < GT; ++g) dk[j][g] = _mm512_fmadd_ps(cf, _mm512_set1_ps(Q.ql[g * DT + c + j]), dk[j][g]);
      }
      if ((c + 4) % group == 0) {   // the end of group k: apply its scale and zero
        const int64_t k = c / group;
        const __m512 s = _mm512_loadu_ps(T.s.data() + k * kTile), z = _mm512_loadu_ps(T.z.data() + k * kTile);
        for (int g = 0; g < GT; ++g) {
          const __m512 d = _mm512_add_ps(_mm512_add_ps(dk[0][g], dk[1][g]), _mm512_add_ps(dk[2][g], dk[3][g]));
          l[g] = _mm512_fmadd_ps(s, d, _mm512_fmadd_ps(z, _mm512_set1_ps(Q.qsum[g * NG + k]), l[g]));
          for (int j = 0; j < 4; ++j) dk[j][g] = _mm512_setzero_ps();
        }
      }
    }
  }
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
  for (int g = 0; g < GT; ++g) _mm512_mask_storeu_ps(lg + g * ld, m, l[g]);
}

// Logits of the lo keys (KB-bit codes) of the context tokens [0, pos) in blocks [j0, j1) into lg [GT, S].
template <int KB, int GT, int DT, class Region>
void decode_lo_logits512(const Layout& L, const Region& region, int64_t pos, int64_t j0, int64_t j1,
                         const QueryLo& query, float* lg, int64_t S, CodeTile& T) {
  const int64_t N = L.N, P = L.k_packed(), NG = L.groups(), MB = NG * L.meta_bytes();
  const bool fp8 = L.group_meta == 1;
  for (int64_t j = j0; j < j1 && j * N < pos; ++j) {
    const uint8_t* reg = region(j);
    const int64_t n_here = std::min(N, pos - j * N);
    for (int64_t o = 0; o < n_here; o += kTile) {
      const int64_t n = std::min<int64_t>(kTile, n_here - o);
      load_code_tile<KB>(reg + L.k_lo + o * P, reg + L.k_sz + o * MB, fp8, n, DT, P, NG, false, T);
      tile_logits512<GT, DT>(T, query, n, L.group, lg + j * N + o, S);
    }
  }
}

// P @ V of the lo values (VB-bit codes) of the context tokens [0, pos) in blocks [j0, j1) with weights
// p [GT, S] (0 where the hi copy stands in): out [GT, DT] += sum_t (p s) c_t, zacc [GT, NG] += sum_t p z.
template <int VB, int GT, int DT, class Region>
void decode_lo_pv512(const Layout& L, const Region& region, int64_t pos, int64_t j0, int64_t j1, const float* p,
                     int64_t S, float* out, float* zacc, CodeTile& T) {
  constexpr int NV = DT / 16;
  const int64_t N = L.N, P = L.v_packed(), NG = L.groups(), MB = NG * L.meta_bytes(), group = L.group;
  const bool fp8 = L.group_meta == 1;
  int kv[NV];   // group of channel vector jv
  for (int jv = 0; jv < NV; ++jv) kv[jv] = static_cast<int>(16 * jv / group);
  __m512 acc[GT][NV];
  for (int g = 0; g < GT; ++g)
    for (int jv = 0; jv < NV; ++jv) acc[g][jv] = _mm512_loadu_ps(out + g * DT + 16 * jv);
  alignas(64) float w[GT][DT / 16][kTile];   // p * s per query head, group and token (NG <= NV)
  __m512 zv[GT][DT / 16];
  for (int g = 0; g < GT; ++g)
    for (int64_t k = 0; k < NG; ++k) zv[g][k] = _mm512_setzero_ps();
  for (int64_t j = j0; j < j1 && j * N < pos; ++j) {
    const uint8_t* reg = region(j);
    const int64_t n_here = std::min(N, pos - j * N);
    for (int64_t o = 0; o < n_here; o += kTile) {
      const int64_t n = std::min<int64_t>(kTile, n_here - o), t0 = j * N + o;
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
      load_code_tile<VB>(reg + L.v_lo + o * P, reg + L.v_sz + o * MB, fp8, n, DT, P, NG, false, T);
      for (int g = 0; g < GT; ++g) {
        const __m512 pg = _mm512_maskz_loadu_ps(m, p + g * S + t0);
        for (int64_t k = 0; k < NG; ++k) {
          _mm512_store_ps(w[g][k], _mm512_mul_ps(pg, _mm512_loadu_ps(T.s.data() + k * kTile)));
          zv[g][k] = _mm512_fmadd_ps(pg, _mm512_maskz_loadu_ps(m, T.z.data() + k * kTile), zv[g][k]);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t* cu = T.cu.data() + i * DT;
        __m512 cv[NV];
        for (int jv = 0; jv < NV; ++jv)
          cv[jv] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(cu + 16 * jv))));
        for (int g = 0; g < GT; ++g)
          for (int jv = 0; jv < NV; ++jv) acc[g][jv] = _mm512_fmadd_ps(_mm512_set1_ps(w[g][kv[jv]][i]), cv[jv], acc[g][jv]);
      }
    }
  }
  for (int g = 0; g < GT; ++g)
    for (int jv = 0; jv < NV; ++jv) _mm512_storeu_ps(out + g * DT + 16 * jv, acc[g][jv]);
  for (int g = 0; g < GT; ++g)
    for (int64_t k = 0; k < NG; ++k) zacc[g * NG + k] += _mm512_reduce_add_ps(zv[g][k]);
}

}  // namespace

#endif  // MIKV_QDOT_AVX512
