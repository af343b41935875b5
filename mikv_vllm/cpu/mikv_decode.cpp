// Fused MiKV decode step on CPU: store + two-tier attention + score accumulation + hi-set upkeep,
// reading the packed page bytes directly. Semantics: mikv_vllm.core.reference (decode_balancer +
// store_at + gather_decode + attention_decode + accumulate_scores_decode + maintain_hi_decode, the
// last byte for byte). Scores live in the hi slots (one fp32 per slot, next to its tag): the step
// adds each hi token's mass to its slot's score; the new token's candidate score is its own mass.
// The upkeep is incremental: one new candidate per step, so at most one token loses its hi slot
// (a linear scan, no sort over the context).
//
// One task per (request b, KV head h), run with at::parallel_for (OpenMP). Every task touches only
// the regions (blk, h) of its own request's blocks, so tasks never write the same bytes.
// Shared prefix blocks (prefix caching): columns j < own_from[b] are read-only for request b: their
// hi slots count only with tags <= shared_hi[b] (reference.shared_hi_limit), their scores are not
// written (reference: own_from / shared_hi of gather_decode and accumulate_scores_decode).
#include <ATen/Parallel.h>

#include "mikv_qdot.h"
#include "mikv_steps.h"
#include "mikv_tiles512.h"

namespace {

// f(codes, s/z records, n, first position) for every tile of up to kTile lo tokens of the context
// [0, pos): codes at offset lo of the tile's region (P bytes a token), records at offset sz.
template <class Region, class F>
void for_lo_tiles(const Layout& L, const Region& region, int64_t pos, int64_t lo, int64_t sz, int64_t P, F&& f) {
  const int64_t N = L.N, MB = L.groups() * L.meta_bytes();
  for (int64_t j = 0; j * N < pos; ++j) {
    const uint8_t* reg = region(j);
    const int64_t n_here = std::min(N, pos - j * N);
    for (int64_t o = 0; o < n_here; o += kTile)
      f(reg + lo + o * P, reg + sz + o * MB, std::min<int64_t>(kTile, n_here - o), j * N + o);
  }
}

// Logits of the lo keys (codes at KB = k_bits) of context tokens [0, pos) into lg [G, S].
template <int KB, class Region>
void decode_lo_logits(const Layout& L, const Region& region, int64_t pos, const QueryLo& query, int64_t G, bool int8,
                      float* lg, int64_t S, CodeTile& T) {
  const int64_t D = L.D, P = L.k_packed(), NG = L.groups();
  const bool fp8 = L.group_meta == 1;
  for_lo_tiles(L, region, pos, L.k_lo, L.k_sz, P, [&](const uint8_t* p, const uint8_t* sz, int64_t n, int64_t t0) {
    load_code_tile<KB>(p, sz, fp8, n, D, P, NG, !int8, T);
    tile_logits<KB>(T, query, n, G, D, L.group, int8, lg + t0, S);
  });
}

// P @ V of the lo values (codes at VB = v_bits) of context tokens [0, pos) into out [G, D] and zacc
// [G, NG]: with the accumulators in registers for the fixed shapes GT / DT (AVX-512, one group per
// 16 channels or more), else any shape.
template <int VB, int GT, int DT, class Region>
void decode_lo_pv(const Layout& L, const Region& region, int64_t pos, const float* p, int64_t S, int64_t G, int64_t D,
                  float* out, float* zacc, CodeTile& T) {
  const int64_t P = L.v_packed(), NG = L.groups();
  const bool fp8 = L.group_meta == 1;
#ifdef MIKV_QDOT_AVX512
  if constexpr (GT > 0 && DT > 0 && DT % 16 == 0) {
    if (L.group % 16 == 0) {
      __m512 acc[GT][DT / 16];
      for (int g = 0; g < GT; ++g)
        for (int j = 0; j < DT / 16; ++j) acc[g][j] = _mm512_loadu_ps(out + g * D + 16 * j);
      for_lo_tiles(L, region, pos, L.v_lo, L.v_sz, P, [&](const uint8_t* c, const uint8_t* sz, int64_t n, int64_t t0) {
        load_code_tile<VB>(c, sz, fp8, n, D, P, NG, false, T);
        tile_pv_fixed<GT, DT>(T, p + t0, S, n, L.group, acc, zacc);
      });
      for (int g = 0; g < GT; ++g)
        for (int j = 0; j < DT / 16; ++j) _mm512_storeu_ps(out + g * D + 16 * j, acc[g][j]);
      return;
    }
  }
#endif
  for_lo_tiles(L, region, pos, L.v_lo, L.v_sz, P, [&](const uint8_t* c, const uint8_t* sz, int64_t n, int64_t t0) {
    load_code_tile<VB>(c, sz, fp8, n, D, P, NG, false, T);
    tile_pv(T, p + t0, S, n, G, D, L.group, out, zacc);
  });
}

// Per-task scratch (reused across the tasks of one thread).
struct DecodeScratch {
  std::vector<float> buf;
  std::vector<int32_t> hmap, hi_t, hi_slot;
  std::vector<uint8_t> codes;
  UpkeepScratch up;
  QueryLo query;
  CodeTile tile;
};

// GT / DT: compile-time query-group size and head_dim (0 = runtime), so the common shapes keep
// their accumulators in registers. int8: the QK mode (mikv_qdot.h). The lo widths are dispatched
// apart: keys (k_bits) in the QK loop, values (v_bits) in the P.V loop.
template <int GT, int DT>
void decode_task(const Layout& L, const Regions& region, int64_t pos, const float* q, const float* kn,
                 const float* vn, float scale, int64_t G_rt, bool do_store, bool upkeep, const Selection& sel,
                 bool int8, float* out, DecodeScratch& ws, int64_t own_from, int64_t shared_hi) {
  constexpr bool FIXED = GT > 0 && DT > 0;
  const int64_t G = FIXED ? GT : G_rt, D = FIXED ? DT : L.D;
  const int64_t N = L.N, R = L.R, NG = L.groups(), group = L.group;
  [[maybe_unused]] const bool tiles512 = !int8 && group % 16 == 0;   // the exact mode's AVX-512 loops (mikv_tiles512.h)

  // 1. balancer (computed and stored at position 0, loaded otherwise)
  const int64_t S = pos + 1;
  ws.buf.resize(static_cast<size_t>(D) * (G + 3) + static_cast<size_t>(G + 1) * S + G * (NG + 1) + kTile);
  float* bal = ws.buf.data();              // [D]
  float* xk = bal + D;                     // [D] scratch token
  float* vx = xk + D;                      // [D] a V row
  float* qs = vx + D;                      // [G, D] q * scale (hi + new token)
  float* lg = qs + G * D;                  // [G, S] logits -> probabilities
  float* mass = lg + G * S;                // [S] probabilities summed over the group, per position
  float* zacc = mass + S;                  // [G, NG] sum_t p_t z_t
  request_balancer(L, region(0), pos == 0 && do_store, q, G * D, G, kn, D, 1, bal);

  // 2. store the new token at pos: lo copies; tags of a fresh block cleared (scores belong to the slots)
  if (do_store) store_tokens(L, region, pos, 1, kn, vn, D, bal, xk, ws.codes.data());

  // 3. hi copies of the context: position -> j * R + r (tags in (0, pos] of the first ceil(pos/N)
  // blocks; a position tagged twice takes its last slot), listed once each in hi_t / hi_slot
  const int64_t nb_ctx = (pos + N - 1) / N;
  ws.hi_t.clear();
  ws.hi_slot.clear();
  if (R) {
    hi_slot_map(L, region, pos, own_from, shared_hi, ws.hmap);
    const int32_t* hmap = ws.hmap.data();
    for (int64_t j = 0; j < nb_ctx; ++j) {
      const int32_t* tags = reinterpret_cast<const int32_t*>(region(j) + L.tag);
      for (int64_t r = 0; r < R; ++r) {
        const int32_t t = tags[r];
        if (t > 0 && t <= pos && hmap[t - 1] == static_cast<int32_t>(j * R + r)) {
          ws.hi_t.push_back(t - 1);
          ws.hi_slot.push_back(static_cast<int32_t>(j * R + r));
        }
      }
    }
  }
  const int64_t n_hi = static_cast<int64_t>(ws.hi_t.size());

  // 4. logits: the lo codes of every context token (tiles of kTile), then the hi copies over them;
  // without lo copies (eviction) tokens outside the hi set get -inf
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qs[g * D + d] = q[g * D + d] * scale;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  CodeTile& T = ws.tile;
  if (L.has_lo()) {
    prepare_query(qs, bal, G, D, group, int8, ws.query);
    T.resize(D, NG);
    with_bits(L.k_bits, [&](auto kb) {
      constexpr int KB = decltype(kb)::value;
      if constexpr (KB > 0) {
#ifdef MIKV_TILES512
        if constexpr (FIXED && DT % 64 == 0)
          if (tiles512) return decode_lo_logits512<KB, GT, DT>(L, region, pos, ws.query, lg, S, T);
#endif
        decode_lo_logits<KB>(L, region, pos, ws.query, G, int8, lg, S, T);
      }
    });
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < pos; ++t) lg[g * S + t] = NEG_INF;
  }
  for (int64_t i = 0; i < n_hi; ++i) {
    load_hi(hi_copy(L, region, ws.hi_slot[i], L.k_hi), L.hi_dtype, D, xk);
    dots<GT>(qs, G, xk, D, lg + ws.hi_t[i], S);
  }
  for (int64_t g = 0; g < G; ++g) lg[g * S + pos] = dot(qs + g * D, kn, D);

  // 5. softmax per query head; score mass per position (sum over the group's query heads)
  for (int64_t g = 0; g < G; ++g) softmax_row(lg + g * S, S);
  for (int64_t t = 0; t < S; ++t) mass[t] = 0.f;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < S; ++t) mass[t] += lg[g * S + t];

  // 6. P @ V: the hi copies and the new token in fp32 (their weights then set to 0), the lo codes of
  // every context token with the scale folded into the weight, the zero points summed apart
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = lg[g * S + pos] * vn[d];
  for (int64_t i = 0; i < n_hi; ++i) {
    const int64_t t = ws.hi_t[i];
    load_hi(hi_copy(L, region, ws.hi_slot[i], L.v_hi), L.hi_dtype, D, vx);
    for (int64_t g = 0; g < G; ++g) {
      const float p = lg[g * S + t];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * vx[d];
      lg[g * S + t] = 0.f;
    }
  }
  if (L.has_lo()) {
    for (int64_t i = 0; i < G * NG; ++i) zacc[i] = 0.f;
    with_bits(L.v_bits, [&](auto vb) {
      constexpr int VB = decltype(vb)::value;
      if constexpr (VB > 0) {
#ifdef MIKV_TILES512
        if constexpr (FIXED && DT % 64 == 0)
          if (tiles512) return decode_lo_pv512<VB, GT, DT>(L, region, pos, lg, S, out, zacc, T);
#endif
        decode_lo_pv<VB, GT, DT>(L, region, pos, lg, S, G, D, out, zacc, T);
      }
    });
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += zacc[g * NG + d / group];
  }

  // 7. scores of the hi slots, 8. hi-set upkeep (the new token a candidate with its mass as score)
  update_hi_set(L, sel, region, pos, 1, own_from, mass, kn, vn, D, upkeep, ws.up);
}

// decode_task with the compile-time shape of the common (G, D) pairs, else the runtime one.
void decode_dispatch(const Layout& L, const Regions& region, int64_t pos, const float* q, const float* kn,
                     const float* vn, float scale, int64_t G, bool do_store, bool upkeep, const Selection& sel,
                     bool int8, float* out, DecodeScratch& ws, int64_t own_from, int64_t shared_hi) {
#define MIKV_TASK(GT, DT)                                                                                           \
  decode_task<GT, DT>(L, region, pos, q, kn, vn, scale, G, do_store, upkeep, sel, int8, out, ws, own_from, shared_hi)
  if (L.D == 64 && G == 1) MIKV_TASK(1, 64);
  else if (L.D == 64 && G == 3) MIKV_TASK(3, 64);
  else if (L.D == 64 && G == 4) MIKV_TASK(4, 64);
  else if (L.D == 128 && G == 1) MIKV_TASK(1, 128);
  else if (L.D == 128 && G == 2) MIKV_TASK(2, 128);
  else MIKV_TASK(0, 0);
#undef MIKV_TASK
}

}  // namespace

namespace mikv {

// One decode step for B requests (one token each at position pos[b]); returns out [B, Hq, D] fp32.
torch::Tensor decode_step(torch::Tensor regions, const Layout& L, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store, bool upkeep, double hi_ratio, int64_t sink_tokens, int64_t recent_window,
                          torch::Tensor own_from, torch::Tensor shared_hi) {
  const Selection sel = upkeep ? checked_selection(hi_ratio, sink_tokens, recent_window) : Selection{0, 0, -1};
  const StepTensors st = check_step_tensors(L, regions, block_tables, q, k, v, own_from, shared_hi);
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.dim() == 1 && pos.is_contiguous(), "mikv_cpu: pos int64 [B]");
  const int64_t B = q.size(0), H = st.H, G = st.G, Hq = H * G, D = L.D, M = st.M;
  TORCH_CHECK(pos.size(0) == B && block_tables.size(0) == B, "mikv_cpu: pos / block_tables need B = ", B, " rows");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) check_row(L, st.block_tables + b * M, M, regions.size(0), pp[b], pp[b], st.own_from[b]);
  auto out = torch::empty({B, Hq, D}, q.options());
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const bool int8 = qk_int8();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    thread_local DecodeScratch ws;   // kept across calls: a step allocates nothing once warm
    ws.codes.resize(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const Regions region{st.regions, st.block_tables + b * M, H, h, L.region_bytes};
      const float* qb = st.q + (b * Hq + h * G) * D;
      const float* kb = st.k + (b * H + h) * D;
      const float* vb = st.v + (b * H + h) * D;
      float* ob = op + (b * Hq + h * G) * D;
      // shared prefix: own_from[b] the first owned column, shared_hi[b] the stable hi tag limit
      decode_dispatch(L, region, pp[b], qb, kb, vb, sc, G, do_store, upkeep, sel, int8, ob, ws, st.own_from[b],
                      st.shared_hi[b]);
    }
  });
  return out;
}

}  // namespace mikv
