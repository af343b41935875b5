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
// [0, pos) in blocks [j0, j1): codes at offset lo of the tile's region (P bytes a token), records at
// offset sz.
template <class Region, class F>
void for_lo_tiles(const Layout& L, const Region& region, int64_t pos, int64_t j0, int64_t j1, int64_t lo, int64_t sz,
                  int64_t P, F&& f) {
  const int64_t N = L.N, MB = L.groups() * L.meta_bytes();
  for (int64_t j = j0; j < j1 && j * N < pos; ++j) {
    const uint8_t* reg = region(j);
    const int64_t n_here = std::min(N, pos - j * N);
    for (int64_t o = 0; o < n_here; o += kTile)
      f(reg + lo + o * P, reg + sz + o * MB, std::min<int64_t>(kTile, n_here - o), j * N + o);
  }
}

// Logits of the lo keys (codes at KB = k_bits) of context tokens [0, pos) in blocks [j0, j1) into lg [G, S].
template <int KB, class Region>
void decode_lo_logits(const Layout& L, const Region& region, int64_t pos, int64_t j0, int64_t j1,
                      const QueryLo& query, int64_t G, bool int8, float* lg, int64_t S, CodeTile& T) {
  const int64_t D = L.D, P = L.k_packed(), NG = L.groups();
  const bool fp8 = L.group_meta == 1;
  for_lo_tiles(L, region, pos, j0, j1, L.k_lo, L.k_sz, P, [&](const uint8_t* p, const uint8_t* sz, int64_t n, int64_t t0) {
    load_code_tile<KB>(p, sz, fp8, n, D, P, NG, !int8, T);
    tile_logits<KB>(T, query, n, G, D, L.group, int8, lg + t0, S);
  });
}

// P @ V of the lo values (codes at VB = v_bits) of context tokens [0, pos) in blocks [j0, j1) into
// out [G, D] and zacc [G, NG]: with the accumulators in registers for the fixed shapes GT / DT
// (AVX-512, one group per 16 channels or more), else any shape.
template <int VB, int GT, int DT, class Region>
void decode_lo_pv(const Layout& L, const Region& region, int64_t pos, int64_t j0, int64_t j1, const float* p,
                  int64_t S, int64_t G, int64_t D, float* out, float* zacc, CodeTile& T) {
  const int64_t P = L.v_packed(), NG = L.groups();
  const bool fp8 = L.group_meta == 1;
#ifdef MIKV_QDOT_AVX512
  if constexpr (GT > 0 && DT > 0 && DT % 16 == 0) {
    if (L.group % 16 == 0) {
      __m512 acc[GT][DT / 16];
      for (int g = 0; g < GT; ++g)
        for (int j = 0; j < DT / 16; ++j) acc[g][j] = _mm512_loadu_ps(out + g * D + 16 * j);
      for_lo_tiles(L, region, pos, j0, j1, L.v_lo, L.v_sz, P,
                   [&](const uint8_t* c, const uint8_t* sz, int64_t n, int64_t t0) {
                     load_code_tile<VB>(c, sz, fp8, n, D, P, NG, false, T);
                     tile_pv_fixed<GT, DT>(T, p + t0, S, n, L.group, acc, zacc);
                   });
      for (int g = 0; g < GT; ++g)
        for (int j = 0; j < DT / 16; ++j) _mm512_storeu_ps(out + g * D + 16 * j, acc[g][j]);
      return;
    }
  }
#endif
  for_lo_tiles(L, region, pos, j0, j1, L.v_lo, L.v_sz, P, [&](const uint8_t* c, const uint8_t* sz, int64_t n, int64_t t0) {
    load_code_tile<VB>(c, sz, fp8, n, D, P, NG, false, T);
    tile_pv(T, p + t0, S, n, G, D, L.group, out, zacc);
  });
}

// The lo context is read in segments of kSegTokens tokens (whole blocks): each segment's P @ V sums
// go to their own buffer, added in segment order at the end, so a step's result does not depend on
// whether its segments ran on one thread or on several (split over the context, small batches).
constexpr int64_t kSegTokens = 512;

// One (request, KV head) of a decode step, across its stages.
struct DecodeState {
  std::vector<float> buf;    // bal, xk, vx, qs, lg, mass
  std::vector<float> part;   // [nseg, G * D + G * NG]: each segment's P @ V and zero-point sums
  std::vector<int32_t> hmap, hi_t, hi_slot;
  QueryLo query;
  int64_t S = 0, segb = 1, nseg = 0;   // S = pos + 1; blocks per segment, segments of the context
  float *bal, *xk, *vx, *qs, *lg, *mass;
};

// Per-thread scratch, kept across calls: a step allocates nothing once warm.
struct DecodeScratch {
  std::vector<uint8_t> codes;
  UpkeepScratch up;
  CodeTile tile;
};
inline DecodeScratch& thread_scratch(int64_t D) {
  thread_local DecodeScratch ws;
  ws.codes.resize(D);
  return ws;
}

// The stages of one (request, KV head), for the compile-time query-group size GT and head_dim DT
// (0 = runtime), so the common shapes keep their accumulators in registers. int8: the QK mode
// (mikv_qdot.h). The lo widths are dispatched apart: keys (k_bits) in the QK loop, values (v_bits)
// in the P.V loop. begin, logits(segments), middle, pv(segments), finish: the segment stages of
// different segments may run on different threads.
template <int GT, int DT>
struct Decode {
  static constexpr bool FIXED = GT > 0 && DT > 0;
  const Layout& L;
  const Regions& region;
  int64_t pos, G, D;
  bool int8;
  DecodeState& st;

  Decode(const Layout& L_, const Regions& region_, int64_t pos_, int64_t G_rt, bool int8_, DecodeState& st_)
      : L(L_), region(region_), pos(pos_), G(FIXED ? GT : G_rt), D(FIXED ? DT : L_.D), int8(int8_), st(st_) {}

  bool tiles512() const { return !int8 && L.group % 16 == 0; }   // the exact mode's AVX-512 loops (mikv_tiles512.h)

  // 1. balancer (computed and stored at position 0, loaded otherwise), 2. the new token's store,
  // 3. the hi copies of the context, the query (scaled, prepared for the lo codes).
  void begin(const float* q, const float* kn, const float* vn, float scale, bool do_store, int64_t own_from,
             int64_t shared_hi, DecodeScratch& ws) {
    const int64_t N = L.N, R = L.R, NG = L.groups(), S = pos + 1;
    st.S = S;
    st.segb = std::max<int64_t>(1, kSegTokens / N);
    st.nseg = (pos + st.segb * N - 1) / (st.segb * N);
    st.buf.resize(static_cast<size_t>(D) * (G + 3) + static_cast<size_t>(G + 1) * S + kTile);   // + a tile's slack
    st.bal = st.buf.data();   // [D]
    st.xk = st.bal + D;       // [D] scratch token
    st.vx = st.xk + D;        // [D] a V row
    st.qs = st.vx + D;        // [G, D] q * scale (hi + new token)
    st.lg = st.qs + G * D;    // [G, S] logits -> probabilities
    st.mass = st.lg + G * S;  // [S] probabilities summed over the group, per position
    st.part.resize(static_cast<size_t>(st.nseg) * G * (D + NG));
    request_balancer(L, region(0), pos == 0 && do_store, q, G * D, G, kn, D, 1, st.bal);
    // 2. store the new token at pos: lo copies; tags of a fresh block cleared (scores belong to the slots)
    if (do_store) store_tokens(L, region, pos, 1, kn, vn, D, st.bal, st.xk, ws.codes.data());
    // 3. hi copies of the context: position -> j * R + r (tags in (0, pos] of the first ceil(pos/N)
    // blocks; a position tagged twice takes its last slot), listed once each in hi_t / hi_slot
    const int64_t nb_ctx = (pos + N - 1) / N;
    st.hi_t.clear();
    st.hi_slot.clear();
    if (R) {
      hi_slot_map(L, region, pos, own_from, shared_hi, st.hmap);
      const int32_t* hmap = st.hmap.data();
      for (int64_t j = 0; j < nb_ctx; ++j) {
        const int32_t* tags = reinterpret_cast<const int32_t*>(region(j) + L.tag);
        for (int64_t r = 0; r < R; ++r) {
          const int32_t t = tags[r];
          if (t > 0 && t <= pos && hmap[t - 1] == static_cast<int32_t>(j * R + r)) {
            st.hi_t.push_back(t - 1);
            st.hi_slot.push_back(static_cast<int32_t>(j * R + r));
          }
        }
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) st.qs[g * D + d] = q[g * D + d] * scale;
    if (L.has_lo()) prepare_query(st.qs, st.bal, G, D, L.group, int8, st.query);
  }

  // 4a. logits of the lo codes of the context tokens in segments [s0, s1) (without lo copies,
  // eviction: -inf, the hi copies come in middle)
  void logits(int64_t s0, int64_t s1, CodeTile& T) {
    const int64_t j0 = s0 * st.segb, j1 = s1 * st.segb, S = st.S;
    if (!L.has_lo()) {
      const float NEG_INF = -std::numeric_limits<float>::infinity();
      for (int64_t g = 0; g < G; ++g)
        for (int64_t t = j0 * L.N; t < std::min(pos, j1 * L.N); ++t) st.lg[g * S + t] = NEG_INF;
      return;
    }
    T.resize(D, L.groups());
    with_bits(L.k_bits, [&](auto kb) {
      constexpr int KB = decltype(kb)::value;
      if constexpr (KB > 0) {
#ifdef MIKV_TILES512
        if constexpr (FIXED && DT % 64 == 0)
          if (tiles512()) return decode_lo_logits512<KB, GT, DT>(L, region, pos, j0, j1, st.query, st.lg, S, T);
#endif
        decode_lo_logits<KB>(L, region, pos, j0, j1, st.query, G, int8, st.lg, S, T);
      }
    });
  }

  // 4b. the hi copies' logits over the lo ones, the new token's; 5. softmax per query head, score mass
  // per position (sum over the group's query heads); 6a. out = the new token's and the hi copies'
  // share of P @ V (in fp32; their weights then set to 0 for the lo pass)
  void middle(const float* kn, const float* vn, float* out) {
    const int64_t S = st.S, n_hi = static_cast<int64_t>(st.hi_t.size());
    float* lg = st.lg;
    for (int64_t i = 0; i < n_hi; ++i) {
      load_hi(hi_copy(L, region, st.hi_slot[i], L.k_hi), L.hi_dtype, D, st.xk);
      dots<GT>(st.qs, G, st.xk, D, lg + st.hi_t[i], S);
    }
    for (int64_t g = 0; g < G; ++g) lg[g * S + pos] = dot(st.qs + g * D, kn, D);
    for (int64_t g = 0; g < G; ++g) softmax_row(lg + g * S, S);
    for (int64_t t = 0; t < S; ++t) st.mass[t] = 0.f;
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < S; ++t) st.mass[t] += lg[g * S + t];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[g * D + d] = lg[g * S + pos] * vn[d];
    for (int64_t i = 0; i < n_hi; ++i) {
      const int64_t t = st.hi_t[i];
      load_hi(hi_copy(L, region, st.hi_slot[i], L.v_hi), L.hi_dtype, D, st.vx);
      for (int64_t g = 0; g < G; ++g) {
        const float p = lg[g * S + t];
        for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * st.vx[d];
        lg[g * S + t] = 0.f;
      }
    }
  }

  // 6b. P @ V of the lo codes of segments [s0, s1), each into its part (scales folded into the
  // weights, zero points summed apart)
  void pv(int64_t s0, int64_t s1, CodeTile& T) {
    if (!L.has_lo()) return;
    const int64_t NG = L.groups();
    T.resize(D, NG);
    for (int64_t s = s0; s < s1; ++s) {
      float* po = st.part.data() + s * G * (D + NG);
      float* pz = po + G * D;
      std::fill(po, po + G * (D + NG), 0.f);
      const int64_t j0 = s * st.segb, j1 = j0 + st.segb;
      with_bits(L.v_bits, [&](auto vb) {
        constexpr int VB = decltype(vb)::value;
        if constexpr (VB > 0) {
#ifdef MIKV_TILES512
          if constexpr (FIXED && DT % 64 == 0)
            if (tiles512()) return decode_lo_pv512<VB, GT, DT>(L, region, pos, j0, j1, st.lg, st.S, po, pz, T);
#endif
          decode_lo_pv<VB, GT, DT>(L, region, pos, j0, j1, st.lg, st.S, G, D, po, pz, T);
        }
      });
    }
  }

  // 6c. out += the segments' P @ V, then their zero-point sums, in segment order; 7. scores of the hi
  // slots, 8. hi-set upkeep (the new token a candidate with its mass as score)
  void finish(const float* kn, const float* vn, const Selection& sel, bool upkeep, int64_t own_from, float* out,
              DecodeScratch& ws) {
    if (L.has_lo() && st.nseg > 0) {
      const int64_t NG = L.groups(), group = L.group;
      float* zacc = st.part.data() + G * D;   // segment 0's zero-point sums collect the others'
      for (int64_t s = 0; s < st.nseg; ++s) {
        const float* po = st.part.data() + s * G * (D + NG);
        for (int64_t i = 0; i < G * D; ++i) out[i] += po[i];
        if (s > 0)
          for (int64_t i = 0; i < G * NG; ++i) zacc[i] += po[G * D + i];
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[g * D + d] += zacc[g * NG + d / group];
    }
    update_hi_set(L, sel, region, pos, 1, own_from, st.mass, kn, vn, D, upkeep, ws.up);
  }
};

// f(Decode<GT, DT>) with the compile-time shape of the common (G, D) pairs, else the runtime one.
template <class F>
void with_shape(const Layout& L, const Regions& region, int64_t pos, int64_t G, bool int8, DecodeState& st, F&& f) {
#define MIKV_SHAPE(GT, DT) return f(Decode<GT, DT>(L, region, pos, G, int8, st))
  if (L.D == 64 && G == 1) MIKV_SHAPE(1, 64);
  if (L.D == 64 && G == 3) MIKV_SHAPE(3, 64);
  if (L.D == 64 && G == 4) MIKV_SHAPE(4, 64);
  if (L.D == 128 && G == 1) MIKV_SHAPE(1, 128);
  if (L.D == 128 && G == 2) MIKV_SHAPE(2, 128);
  MIKV_SHAPE(0, 0);
#undef MIKV_SHAPE
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
  auto task = [&](int64_t i) {   // (request b, KV head h) = i: its rows of q / k / v / out, its blocks
    const int64_t b = i / H, h = i % H;
    return std::make_tuple(Regions{st.regions, st.block_tables + b * M, H, h, L.region_bytes},
                           st.q + (b * Hq + h * G) * D, st.k + (b * H + h) * D, st.v + (b * H + h) * D,
                           op + (b * Hq + h * G) * D);
  };
  // a split over the context when there are fewer (request, KV head) tasks than two per thread and
  // a context of four segments or more: the segments of each task's lo context run on all threads
  // (the other stages per task; each stage is a parallel region of its own, a few us each, which
  // costs more than it saves below ~2k tokens on 2 cores)
  const int64_t threads = at::get_num_threads(), BH = B * H;
  const int64_t longest = B ? *std::max_element(pp, pp + B) : 0;
  if (threads > 1 && BH < 2 * threads && longest >= 4 * kSegTokens) {
    thread_local std::vector<DecodeState> pool;   // per calling thread, kept across calls
    if (static_cast<int64_t>(pool.size()) < BH) pool.resize(BH);
    std::vector<DecodeState>& states = pool;   // the lambdas below run on other threads
    auto each = [&](auto&& f) {   // f(Decode, i, q, k, v, out rows) for every task, in parallel
      at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const auto [region, qb, kb, vb, ob] = task(i);
          with_shape(L, region, pp[i / H], G, int8, states[i], [&](auto dec) { f(dec, i, qb, kb, vb, ob); });
        }
      });
    };
    std::vector<std::pair<int64_t, int64_t>> work;   // (task, segment), listed once begin has set nseg
    auto segments = [&](auto&& f) {   // f(Decode, segment) for every (task, segment), in parallel
      at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
        CodeTile& tile = thread_scratch(D).tile;
        for (int64_t k = begin; k < end; ++k) {
          const auto [i, s] = work[k];
          const Regions region = std::get<0>(task(i));
          with_shape(L, region, pp[i / H], G, int8, states[i], [&](auto dec) { f(dec, s, tile); });
        }
      });
    };
    each([&](auto& dec, int64_t i, const float* qb, const float* kb, const float* vb, float*) {
      dec.begin(qb, kb, vb, sc, do_store, st.own_from[i / H], st.shared_hi[i / H], thread_scratch(D));
    });
    for (int64_t i = 0; i < BH; ++i)
      for (int64_t s = 0; s < states[i].nseg; ++s) work.emplace_back(i, s);
    segments([&](auto& dec, int64_t s, CodeTile& T) { dec.logits(s, s + 1, T); });
    each([&](auto& dec, int64_t, const float*, const float* kb, const float* vb, float* ob) { dec.middle(kb, vb, ob); });
    segments([&](auto& dec, int64_t s, CodeTile& T) { dec.pv(s, s + 1, T); });
    each([&](auto& dec, int64_t i, const float*, const float* kb, const float* vb, float* ob) {
      dec.finish(kb, vb, sel, upkeep, st.own_from[i / H], ob, thread_scratch(D));
    });
    return out;
  }
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    DecodeScratch& ws = thread_scratch(D);
    thread_local DecodeState state;
    for (int64_t i = begin; i < end; ++i) {
      const auto [region, qb, kb, vb, ob] = task(i);
      // shared prefix: own_from[b] the first owned column, shared_hi[b] the stable hi tag limit
      with_shape(L, region, pp[i / H], G, int8, state, [&](auto dec) {
        dec.begin(qb, kb, vb, sc, do_store, st.own_from[i / H], st.shared_hi[i / H], ws);
        dec.logits(0, state.nseg, ws.tile);
        dec.middle(kb, vb, ob);
        dec.pv(0, state.nseg, ws.tile);
        dec.finish(kb, vb, sel, upkeep, st.own_from[i / H], ob, ws);
      });
    }
  });
  return out;
}

}  // namespace mikv
