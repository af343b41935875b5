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

namespace {

// Hi-set upkeep of one (request, KV head) after the new token at `pos` was stored and the slot
// scores accumulated (reference.maintain_hi_decode, byte for byte). Candidates: the tokens tagged
// now (tag in (0, pos] in the request's owned blocks, own_from on; score: their slot's) + the new
// token (score: its mass of this step, `new_mass`). Their number never exceeds budget + 1 in a
// normal run (the budget does not shrink as L grows), so at most one loses; more candidates (stale
// tags in reused blocks, fewer slots than before) take a full selection. Losers and stale tags are
// cleared (their scores left as they are); a selected new token takes the lowest free slot with its
// mass as score and its raw K/V in the hi dtype (clamped as quant.to_hi).
template <class Region>
void upkeep_hi(const Layout& L, const Selection& sel, int64_t pos, int64_t own_from, const float* kn, const float* vn,
               float new_mass, const Region& region, std::vector<Cand>& cands) {
  // slots of the owned columns [own_from, nb) only (shared prefix columns are read-only)
  const int64_t R = L.R, nb = pos / L.N + 1, num_slots = nb * R, length = pos + 1;
  const int64_t budget = hi_budget(sel, length, (nb - own_from) * R);
  const int64_t recent_from = recent_start(sel, length, budget);
  const float new_score = new_token_score(new_mass);
  // candidates: tagged slots in slot order, then the new token (index num_slots); stale tags cleared
  cands.clear();
  for (int64_t j = own_from; j < nb; ++j) {
    int32_t* tags = slot_tags(L, region(j));
    const float* scores = slot_scores(L, region(j));
    for (int64_t r = 0; r < R; ++r) {
      if (tags[r] > 0 && tags[r] <= pos) cands.push_back(make_cand(sel, recent_from, tags[r] - 1, j * R + r, scores[r]));
      else tags[r] = 0;
    }
  }
  cands.push_back(make_cand(sel, recent_from, pos, num_slots, new_score));
  bool new_kept = true;
  select_losers(cands, budget, [&](const Cand& c) {
    if (c.idx == num_slots) new_kept = false;
    else slot_tags(L, region(c.idx / R))[c.idx % R] = 0;
  });
  if (!new_kept) return;
  for (int64_t s = own_from * R; s < num_slots; ++s) {   // lowest free owned slot (one exists: kept <= budget <= num_slots)
    uint8_t* reg = region(s / R);
    int32_t* tag = slot_tags(L, reg) + s % R;
    if (*tag != 0) continue;
    *tag = static_cast<int32_t>(pos + 1);
    fill_slot(L, reg, s % R, new_score, kn, vn);
    return;
  }
  TORCH_CHECK(false, "mikv_cpu: no free hi slot for a selected token");   // unreachable: budget <= num_slots
}

// P @ V of the lo codes of context tokens [0, pos) into out [G, D] and zacc [G, NG] (any shape).
template <int BITS, class Region>
void decode_pv_generic(const Layout& L, const Region& region, int64_t nb_ctx, int64_t pos, const float* p, int64_t S,
                       int64_t G, int64_t D, float* out, float* zacc, CodeTile& T) {
  const int64_t N = L.N, P = L.packed(), NG = L.groups();
  for (int64_t j = 0; j < nb_ctx; ++j) {
    const uint8_t* reg = region(j);
    const int64_t n_here = std::min(N, pos - j * N);
    for (int64_t o = 0; o < n_here; o += kTile) {
      const int64_t n = std::min<int64_t>(kTile, n_here - o);
      load_code_tile<BITS>(reg + L.v_lo + o * P, reinterpret_cast<const uint16_t*>(reg + L.v_sz) + o * NG * 2, n, D, P,
                           NG, false, T);
      tile_pv(T, p + j * N + o, S, n, G, D, L.group, out, zacc);
    }
  }
}

// Per-task scratch (reused across the tasks of one thread).
struct DecodeScratch {
  std::vector<float> buf;
  std::vector<int32_t> hmap, hi_t, hi_slot;
  std::vector<uint8_t> codes;
  std::vector<Cand> cands;
  QueryLo query;
  CodeTile tile;
};

// GT / DT: compile-time query-group size and head_dim (0 = runtime), so the common shapes keep
// their accumulators in registers. int8: the QK mode (mikv_qdot.h).
template <int BITS, int GT, int DT>
void decode_task(const Layout& L, uint8_t* regions, int64_t H, const int32_t* row, int64_t pos, const float* q,
                 const float* kn, const float* vn, float scale, int64_t G_rt, bool do_store, bool upkeep,
                 const Selection& sel, bool int8, float* out, DecodeScratch& ws, int64_t h, int64_t own_from,
                 int64_t shared_hi) {
  constexpr bool FIXED = GT > 0 && DT > 0;
  const int64_t G = FIXED ? GT : G_rt, D = FIXED ? DT : L.D;
  const int64_t N = L.N, R = L.R, P = L.packed(), NG = L.groups(), group = L.group;
  auto region = [&](int64_t j) { return regions + (static_cast<int64_t>(row[j]) * H + h) * L.region_bytes; };

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
  for (int64_t d = 0; d < D; ++d) bal[d] = 1.f;
  if (L.has_bal) {
    uint16_t* bs = reinterpret_cast<uint16_t*>(region(0) + L.balancer);
    if (pos == 0 && do_store) balancer_to_storage(q, G * D, G, kn, D, 1, D, bs);
    for (int64_t d = 0; d < D; ++d) bal[d] = half_to_float(bs[d]);
  }

  // 2. store the new token at pos: lo copies; tags of a fresh block cleared (scores belong to the slots)
  if (do_store) {
    uint8_t* reg = region(pos / N);
    const int64_t off = pos % N;
    if (R) {
      if (off == 0) std::memset(reg + L.tag, 0, R * sizeof(int32_t));
    }
    if (L.bits) {
      for (int64_t d = 0; d < D; ++d) xk[d] = kn[d] * bal[d];
      quantize_token(xk, D, L.bits, L.group, reg + L.k_lo + off * P,
                     reinterpret_cast<uint16_t*>(reg + L.k_sz) + off * NG * 2, ws.codes.data());
      quantize_token(vn, D, L.bits, L.group, reg + L.v_lo + off * P,
                     reinterpret_cast<uint16_t*>(reg + L.v_sz) + off * NG * 2, ws.codes.data());
    }
  }

  // 3. hi copies of the context: position -> j * R + r (tags in (0, pos] of the first ceil(pos/N)
  // blocks; a position tagged twice takes its last slot), listed once each in hi_t / hi_slot
  const int64_t nb_ctx = (pos + N - 1) / N;
  ws.hi_t.clear();
  ws.hi_slot.clear();
  if (R) {
    ws.hmap.assign(static_cast<size_t>(pos), -1);
    int32_t* hmap = ws.hmap.data();
    for (int64_t j = 0; j < nb_ctx; ++j) {
      const int32_t* tags = reinterpret_cast<const int32_t*>(region(j) + L.tag);
      const int64_t lim = j < own_from ? std::min(shared_hi, pos) : pos;   // shared: stable hi copies only
      for (int64_t r = 0; r < R; ++r) {
        const int32_t t = tags[r];
        if (t > 0 && t <= lim) hmap[t - 1] = static_cast<int32_t>(j * R + r);
      }
    }
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
  const int64_t hi_es = L.hi_elem(), n_hi = static_cast<int64_t>(ws.hi_t.size());
  auto hi_ptr = [&](int64_t slot, int64_t off_base) {
    return region(slot / R) + off_base + (slot % R) * D * hi_es;
  };

  // 4. logits: the lo codes of every context token (tiles of kTile), then the hi copies over them;
  // without lo copies (eviction) tokens outside the hi set get -inf
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qs[g * D + d] = q[g * D + d] * scale;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  CodeTile& T = ws.tile;
  if (BITS) {
    prepare_query(qs, bal, G, D, group, int8, ws.query);
    T.resize(D, NG);
    for (int64_t j = 0; j < nb_ctx; ++j) {
      const uint8_t* reg = region(j);
      const int64_t n_here = std::min(N, pos - j * N);
      for (int64_t o = 0; o < n_here; o += kTile) {
        const int64_t n = std::min<int64_t>(kTile, n_here - o);
        load_code_tile<BITS>(reg + L.k_lo + o * P, reinterpret_cast<const uint16_t*>(reg + L.k_sz) + o * NG * 2, n, D,
                             P, NG, !int8, T);
        tile_logits<BITS>(T, ws.query, n, G, D, group, int8, lg + j * N + o, S);
      }
    }
  } else {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < pos; ++t) lg[g * S + t] = NEG_INF;
  }
  for (int64_t i = 0; i < n_hi; ++i) {
    load_hi(hi_ptr(ws.hi_slot[i], L.k_hi), L.hi_dtype, D, xk);
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
    load_hi(hi_ptr(ws.hi_slot[i], L.v_hi), L.hi_dtype, D, vx);
    for (int64_t g = 0; g < G; ++g) {
      const float p = lg[g * S + t];
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += p * vx[d];
      lg[g * S + t] = 0.f;
    }
  }
  if (BITS) {
    for (int64_t i = 0; i < G * NG; ++i) zacc[i] = 0.f;
#ifdef MIKV_QDOT_AVX512
    constexpr bool REGS = FIXED && DT % 16 == 0;
#else
    constexpr bool REGS = false;
#endif
    if constexpr (REGS) {
#ifdef MIKV_QDOT_AVX512
      if (group % 16 == 0) {
        __m512 acc[GT > 0 ? GT : 1][DT > 0 ? DT / 16 : 1];
        for (int g = 0; g < GT; ++g)
          for (int j = 0; j < DT / 16; ++j) acc[g][j] = _mm512_loadu_ps(out + g * D + 16 * j);
        for (int64_t j = 0; j < nb_ctx; ++j) {
          const uint8_t* reg = region(j);
          const int64_t n_here = std::min(N, pos - j * N);
          for (int64_t o = 0; o < n_here; o += kTile) {
            const int64_t n = std::min<int64_t>(kTile, n_here - o);
            load_code_tile<BITS>(reg + L.v_lo + o * P, reinterpret_cast<const uint16_t*>(reg + L.v_sz) + o * NG * 2, n,
                                 D, P, NG, false, T);
            tile_pv_fixed<GT, DT>(T, lg + j * N + o, S, n, group, acc, zacc);
          }
        }
        for (int g = 0; g < GT; ++g)
          for (int j = 0; j < DT / 16; ++j) _mm512_storeu_ps(out + g * D + 16 * j, acc[g][j]);
      } else {
        decode_pv_generic<BITS>(L, region, nb_ctx, pos, lg, S, G, D, out, zacc, T);
      }
#endif
    } else {
      decode_pv_generic<BITS>(L, region, nb_ctx, pos, lg, S, G, D, out, zacc, T);
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) out[g * D + d] += zacc[g * NG + d / group];
  }
  if (!R) return;

  // 7. scores: each hi slot of the owned columns (the new token's block included) whose token is in
  // the context gets that token's mass (shared columns are read-only)
  accumulate_slot_scores(L, region, own_from, pos / N + 1, pos, mass);

  // 8. hi-set upkeep (selection, demotion, promotion of the new token with its mass as score)
  if (upkeep) upkeep_hi(L, sel, pos, own_from, kn, vn, mass[pos], region, ws.cands);
}

template <int BITS>
void decode_dispatch(const Layout& L, uint8_t* regions, int64_t H, const int32_t* row, int64_t pos, const float* q,
                     const float* kn, const float* vn, float scale, int64_t G, bool do_store, bool upkeep,
                     const Selection& sel, bool int8, float* out, DecodeScratch& ws, int64_t h, int64_t own_from,
                     int64_t shared_hi) {
#define MIKV_TASK(GT, DT)                                                                                     \
  decode_task<BITS, GT, DT>(L, regions, H, row, pos, q, kn, vn, scale, G, do_store, upkeep, sel, int8, out, ws, h, \
                            own_from, shared_hi)
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
torch::Tensor decode_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store, bool upkeep, double hi_ratio, int64_t sink_tokens, int64_t recent_window, torch::Tensor own_from,
                          torch::Tensor shared_hi) {
  const Layout L = parse_layout(meta);
  const Selection sel = upkeep ? checked_selection(hi_ratio, sink_tokens, recent_window) : Selection{0, 0, -1};
  TORCH_CHECK(regions.device().is_cpu() && regions.scalar_type() == torch::kUInt8 && regions.dim() == 3 &&
                  regions.is_contiguous() && regions.size(2) == L.region_bytes,
              "mikv_cpu: regions must be contiguous uint8 [blocks, H, ", L.region_bytes, "] on CPU");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "mikv_cpu: block_tables must be contiguous int32 [B, M]");
  TORCH_CHECK(pos.scalar_type() == torch::kInt64 && pos.dim() == 1 && pos.is_contiguous(), "mikv_cpu: pos int64 [B]");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->dim() == 3 && t->is_contiguous() && t->size(2) == L.D,
                "mikv_cpu: q/k/v must be contiguous fp32 [B, heads, ", L.D, "]");
  const int64_t B = q.size(0), Hq = q.size(1), H = regions.size(1), D = L.D;
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && pos.size(0) == B && block_tables.size(0) == B &&
                  k.size(1) == H && v.size(1) == H && Hq % H == 0,
              "mikv_cpu: inconsistent shapes");
  const int64_t G = Hq / H, M = block_tables.size(1), NBLK = regions.size(0);
  for (const auto* t : {&own_from, &shared_hi})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->is_contiguous() && t->size(0) == B,
                "mikv_cpu: own_from / shared_hi must be contiguous int64 [B]");
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* ofp = own_from.data_ptr<int64_t>();
  const int64_t* shp = shared_hi.data_ptr<int64_t>();
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b) {   // bounds: a bad table must raise, not corrupt memory
    TORCH_CHECK(pp[b] >= 0 && pp[b] / L.N < M, "mikv_cpu: position ", pp[b], " outside the block table");
    TORCH_CHECK(ofp[b] >= 0 && ofp[b] * L.N <= pp[b], "mikv_cpu: own_from ", ofp[b], " past position ", pp[b]);
    for (int64_t j = 0; j <= pp[b] / L.N; ++j)
      TORCH_CHECK(bt[b * M + j] >= 0 && bt[b * M + j] < NBLK, "mikv_cpu: block id ", bt[b * M + j], " out of range");
  }
  auto out = torch::empty({B, Hq, D}, q.options());
  uint8_t* rg = regions.data_ptr<uint8_t>();
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const bool int8 = qk_int8();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    DecodeScratch ws;
    ws.codes.resize(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* qb = qp + (b * Hq + h * G) * D;
      const float* kb = kp + (b * H + h) * D;
      const float* vb = vp + (b * H + h) * D;
      float* ob = op + (b * Hq + h * G) * D;
      const int32_t* row = bt + b * M;
      const int64_t of = ofp[b], sh = shp[b];   // shared prefix: first owned column, stable hi tag limit
#define MIKV_DECODE(B) decode_dispatch<B>(L, rg, H, row, pp[b], qb, kb, vb, sc, G, do_store, upkeep, sel, int8, ob, ws, h, of, sh)
      switch (L.bits) {
        case 0: MIKV_DECODE(0); break;
        case 2: MIKV_DECODE(2); break;
        case 3: MIKV_DECODE(3); break;
        case 4: MIKV_DECODE(4); break;
        default: MIKV_DECODE(8); break;
      }
#undef MIKV_DECODE
    }
  });
  return out;
}

}  // namespace mikv
