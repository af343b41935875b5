// The steps the C++ decode and prefill ops both compose (decode is the one-new-token case of a
// chunk): argument checks, the lo-width dispatch, the balancer, the token store, the hi-slot map of
// the context, the slot scores and the hi-set upkeep (candidates, losers, promotion).
#pragma once
#include <type_traits>

#include "mikv_codes.h"
#include "mikv_select.h"

namespace {

// ------------------------------------------------------------------------------ argument checks
// The tensors both ops take: regions uint8 [blocks, H, region_bytes], a block table int32 [rows, M]
// (a row per request or chunk), q fp32 [n, Hq, D] with Hq a multiple of H, k / v fp32 [n, H, D],
// own_from / shared_hi int64 [rows]. Returns their shapes and data (q / k / v through finite_inputs).
struct StepTensors {
  int64_t H, G, M;   // KV heads, query heads per KV head, block-table columns
  uint8_t* regions;
  const int32_t* block_tables;
  torch::Tensor qf, kf, vf;   // q / k / v as the ops see them (finite_inputs; they own a copy if one was needed)
  const float *q, *k, *v;
  const int64_t *own_from, *shared_hi;
};

// x as every op set sees its q / k / v (reference: quant.finite_inputs): x itself when all its
// elements are finite (one pass over the exponent bits), else a copy with NaN -> 0 and
// +-inf -> +-65504 (finite values unchanged).
inline torch::Tensor finite_inputs(const torch::Tensor& x) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(x.data_ptr<float>());
  const int64_t n = x.numel();
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;   // inf or NaN
  return bad ? at::nan_to_num(x, 0.0, 65504.0, -65504.0) : x;
}
inline StepTensors check_step_tensors(const Layout& L, const torch::Tensor& regions, const torch::Tensor& block_tables,
                                      const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& own_from, const torch::Tensor& shared_hi) {
  TORCH_CHECK(regions.device().is_cpu() && regions.scalar_type() == torch::kUInt8 && regions.dim() == 3 &&
                  regions.is_contiguous() && regions.size(2) == L.region_bytes,
              "mikv_cpu: regions must be contiguous uint8 [blocks, H, ", L.region_bytes, "] on CPU");
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt32 && block_tables.dim() == 2 && block_tables.is_contiguous(),
              "mikv_cpu: block_tables must be contiguous int32 [rows, M]");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == torch::kFloat32 && t->dim() == 3 && t->is_contiguous() && t->size(2) == L.D,
                "mikv_cpu: q/k/v must be contiguous fp32 [tokens, heads, ", L.D, "]");
  const int64_t H = regions.size(1), rows = block_tables.size(0);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == H && v.size(1) == H &&
                  q.size(1) % H == 0,
              "mikv_cpu: inconsistent shapes");
  for (const auto* t : {&own_from, &shared_hi})
    TORCH_CHECK(t->scalar_type() == torch::kInt64 && t->dim() == 1 && t->is_contiguous() && t->size(0) == rows,
                "mikv_cpu: own_from / shared_hi must be contiguous int64 [rows]");
  StepTensors st{H, q.size(1) / H, block_tables.size(1), regions.data_ptr<uint8_t>(), block_tables.data_ptr<int32_t>(),
                 finite_inputs(q), finite_inputs(k), finite_inputs(v)};
  st.q = st.qf.data_ptr<float>();
  st.k = st.kf.data_ptr<float>();
  st.v = st.vf.data_ptr<float>();
  st.own_from = own_from.data_ptr<int64_t>();
  st.shared_hi = shared_hi.data_ptr<int64_t>();
  return st;
}

// One block-table row whose tokens lie at positions [ctx, last] (last < ctx: no token): own_from
// inside the context, every block the row uses inside the table and its block ids inside the
// regions. A bad table must raise, not corrupt memory.
inline void check_row(const Layout& L, const int32_t* row, int64_t M, int64_t num_blocks, int64_t ctx, int64_t last,
                      int64_t own_from) {
  TORCH_CHECK(ctx >= 0, "mikv_cpu: negative context ", ctx);
  TORCH_CHECK(own_from >= 0 && own_from * L.N <= ctx, "mikv_cpu: own_from ", own_from, " past context ", ctx);
  if (last < ctx) return;
  TORCH_CHECK(last / L.N < M, "mikv_cpu: position ", last, " outside the block table");
  for (int64_t j = 0; j <= last / L.N; ++j)
    TORCH_CHECK(row[j] >= 0 && row[j] < num_blocks, "mikv_cpu: block id ", row[j], " out of range");
}

// f(std::integral_constant<int, B>{}) for the lo width B = bits (L.k_bits or L.v_bits: keys and
// values are dispatched apart, in their own loops; 0: no lo copies; checked_layout admits 0, 2, 3,
// 4, 8 only).
template <class F>
inline void with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 0: f(std::integral_constant<int, 0>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// ------------------------------------------------------------------------------ page steps
// The request's balancer into bal[D] (1 where the layout has none): when `compute`, first computed
// from n tokens (balancer_to_storage) into block 0's fp16 header; then read from the header.
inline void request_balancer(const Layout& L, uint8_t* first_region, bool compute, const float* q, int64_t q_stride,
                             int64_t G, const float* k, int64_t k_stride, int64_t n, float* bal) {
  for (int64_t d = 0; d < L.D; ++d) bal[d] = 1.f;
  if (!L.has_bal) return;
  uint16_t* bs = reinterpret_cast<uint16_t*>(first_region + L.balancer);
  if (compute) balancer_to_storage(q, q_stride, G, k, k_stride, n, L.D, bs);
  for (int64_t d = 0; d < L.D; ++d) bal[d] = half_to_float(bs[d]);
}

// Store T new tokens at positions [first, first + T) (token t's k / v at kn / vn + t * kv_stride):
// the tags of a block whose offset 0 is written are cleared (scores belong to the slots), then the
// lo copies (keys at k_bits, multiplied by the balancer; values at v_bits). xk [D], codes [D]: scratch.
template <class Region>
inline void store_tokens(const Layout& L, const Region& region, int64_t first, int64_t T, const float* kn,
                         const float* vn, int64_t kv_stride, const float* bal, float* xk, uint8_t* codes) {
  const int64_t N = L.N, D = L.D, R = L.R, Pk = L.k_packed(), Pv = L.v_packed(), MB = L.groups() * L.meta_bytes();
  const bool fp8 = L.group_meta == 1;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p = first + t, off = p % N;
    uint8_t* reg = region(p / N);
    if (R) {
      if (off == 0) std::memset(reg + L.tag, 0, R * sizeof(int32_t));
    }
    if (L.has_lo()) {
      const float* kt = kn + t * kv_stride;
      for (int64_t d = 0; d < D; ++d) xk[d] = kt[d] * bal[d];
      quantize_token(xk, D, L.k_bits, L.group, fp8, reg + L.k_lo + off * Pk, reg + L.k_sz + off * MB, codes);
      quantize_token(vn + t * kv_stride, D, L.v_bits, L.group, fp8, reg + L.v_lo + off * Pv, reg + L.v_sz + off * MB,
                     codes);
    }
  }
}

// The hi copies of a context of ctx tokens: hmap[p] = slot j * R + r holding position p (tags in
// (0, ctx] of the first ceil(ctx / N) blocks; shared columns j < own_from: tags <= shared_hi only,
// their stable hi copies), -1 for none; a position tagged twice takes its last slot.
template <class Region>
inline void hi_slot_map(const Layout& L, const Region& region, int64_t ctx, int64_t own_from, int64_t shared_hi,
                        std::vector<int32_t>& hmap) {
  const int64_t R = L.R;
  hmap.assign(static_cast<size_t>(R ? ctx : 0), -1);
  if (!R) return;
  for (int64_t j = 0; j < (ctx + L.N - 1) / L.N; ++j) {
    const int32_t* tags = slot_tags(L, region(j));
    const int64_t lim = j < own_from ? std::min(shared_hi, ctx) : ctx;   // shared: stable hi copies only
    for (int64_t r = 0; r < R; ++r) {
      const int32_t t = tags[r];
      if (t > 0 && t <= lim) hmap[t - 1] = static_cast<int32_t>(j * R + r);
    }
  }
}

// Scratch of the hi-set upkeep (reused across the tasks of one thread).
struct UpkeepScratch {
  std::vector<Cand> cands;
  std::vector<int32_t> tags;
  std::vector<uint8_t> keep;
};

// After the attention of T new tokens at [ctx, ctx + T) (mass: position-indexed score mass of this
// step over [0, ctx + T)): every hi slot of the owned columns whose token is in the context gets that
// token's mass; then, when `upkeep`, the hi-set upkeep (reference.maintain_hi): the candidates are
// the tokens tagged now (tag in (0, ctx] in the owned blocks, own_from on; score: their slot's) and
// the new tokens (score: their mass), the best `budget` stay; losers and stale tags are cleared
// (their scores left as they are) and each selected new token takes the lowest free owned slot, in
// position order, with its mass as score and its raw K/V as hi copies. Shared columns are read-only.
template <class Region>
inline void update_hi_set(const Layout& L, const Selection& sel, const Region& region, int64_t ctx, int64_t T,
                          int64_t own_from, const float* mass, const float* kn, const float* vn, int64_t kv_stride,
                          bool upkeep, UpkeepScratch& ws) {
  const int64_t N = L.N, R = L.R, S = ctx + T;
  if (!R) return;
  const int64_t nb = (S + N - 1) / N, num_slots = nb * R, first = own_from * R;
  accumulate_slot_scores(L, region, own_from, nb, ctx, mass);
  if (!upkeep) return;

  std::vector<int32_t>& tags = ws.tags;
  tags.resize(static_cast<size_t>(num_slots));
  for (int64_t j = own_from; j < nb; ++j) std::memcpy(&tags[j * R], slot_tags(L, region(j)), R * sizeof(int32_t));
  const int64_t budget = hi_budget(sel, S, num_slots - first);
  const int64_t recent_from = recent_start(sel, S, budget);
  std::vector<uint8_t>& keep = ws.keep;
  keep.assign(static_cast<size_t>(num_slots + T), 0);
  std::vector<Cand>& cands = ws.cands;
  cands.clear();
  for (int64_t s = first; s < num_slots; ++s)
    if (tags[s] > 0 && tags[s] <= ctx) {
      cands.push_back(make_cand(sel, recent_from, tags[s] - 1, s, slot_scores(L, region(s / R))[s % R]));
      keep[s] = 1;
    }
  for (int64_t t = 0; t < T; ++t) {
    cands.push_back(make_cand(sel, recent_from, ctx + t, num_slots + t, new_token_score(mass[ctx + t])));
    keep[num_slots + t] = 1;
  }
  select_losers(cands, budget, [&](const Cand& c) { keep[c.idx] = 0; });
  for (int64_t s = first; s < num_slots; ++s)
    if (!keep[s]) tags[s] = 0;
  int64_t next_free = first;   // selected new tokens take the lowest free slots, in position order
  for (int64_t t = 0; t < T; ++t) {
    if (!keep[num_slots + t]) continue;
    while (next_free < num_slots && tags[next_free] != 0) ++next_free;
    TORCH_CHECK(next_free < num_slots, "mikv_cpu: no free hi slot (budget exceeds the slots)");
    const int64_t slot = next_free;
    tags[slot] = static_cast<int32_t>(ctx + t + 1);
    fill_slot(L, region(slot / R), slot % R, new_token_score(mass[ctx + t]), kn + t * kv_stride, vn + t * kv_stride);
  }
  for (int64_t j = own_from; j < nb; ++j) std::memcpy(slot_tags(L, region(j)), &tags[j * R], R * sizeof(int32_t));
}

}  // namespace
