// The hi-set selection of one (request, KV head) (core.importance.select_hi): budget, recent window,
// candidate priority, losers, slot scores, promotion of a new token into a slot; and the balancer.
#pragma once
#include "mikv_fp.h"
#include "mikv_layout.h"

namespace {

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
