// Fused MiKV prefill step on CPU: every multi-token chunk of a step in one call. Semantics:
// mikv_vllm.core.reference.forward_request per chunk (request_balancer, write_tokens,
// gather_context + attention, accumulate_scores, maintain_hi).
//
// Three parallel phases. 1. per (chunk c, KV head h, piece): balancer, store of the piece's share of
// the chunk's lo copies and of its context decoded once into fp32 buffers (hi copy where tagged, else
// the lo codes dequantized, keys divided by the balancer). 2. per (c, h, block of query rows, at most
// kLogitBudget logits): the rows' logits over every key they see (one sweep of key tiles of the
// decoded context, then the chunk's raw keys), an exact softmax per row, the score mass of the
// voting rows, then P @ V (a second sweep). 3. per (c, h): the mass summed over the blocks, the hi
// slots' scores, the hi-set upkeep. Chunks belong to distinct requests (disjoint blocks); a task
// touches only the regions (blk, h) of its own chunk's blocks. Scores live in the hi slots: each hi
// token's slot gets its mass, and the chunk's tokens compete for the hi set with their own mass of
// this step.
#include <ATen/Parallel.h>

#include <atomic>

#include "mikv_codes.h"
#include "mikv_math.h"
#include "mikv_select.h"
#include "mikv_steps.h"

namespace {

constexpr int64_t kKeyTile = 64;      // keys per tile
constexpr int64_t kQueryVecs = 128;   // query vectors (rows x group heads) per query block, at most
constexpr size_t kKeptBytes = size_t{64} << 20;   // scratch of the (chunk, KV head) pairs kept across calls
constexpr int64_t kLogitBudget = 1 << 17;   // logits per block (512 KiB, within L2): fewer rows for long contexts
// lg[r * ld + 0..KB) = Q[r, :] . kT[:, 0..KB) for rows [0, rows) (kT: keys transposed, row stride ldk);
// 4 rows x KB keys of accumulators per pass (rows are padded to a multiple of 4 in Q and lg).
void tile_qk(const float* __restrict Q, int64_t rows, const float* __restrict kT, int64_t ldk, int64_t D,
             float* __restrict lg, int64_t ld) {
  static_assert(kKeyTile == 64, "tile_qk holds 4 x 16 keys");
  constexpr int64_t KB = kKeyTile;
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
#ifdef __AVX512F__
    __m512 a[4][4];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) a[i][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const float* kt = kT + d * ldk;
      const __m512 k0 = _mm512_loadu_ps(kt), k1 = _mm512_loadu_ps(kt + 16), k2 = _mm512_loadu_ps(kt + 32),
                   k3 = _mm512_loadu_ps(kt + 48);
      for (int i = 0; i < 4; ++i) {
        const __m512 qd = _mm512_set1_ps(Q[(r0 + i) * D + d]);
        a[i][0] = _mm512_fmadd_ps(qd, k0, a[i][0]);
        a[i][1] = _mm512_fmadd_ps(qd, k1, a[i][1]);
        a[i][2] = _mm512_fmadd_ps(qd, k2, a[i][2]);
        a[i][3] = _mm512_fmadd_ps(qd, k3, a[i][3]);
      }
    }
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(lg + (r0 + i) * ld + 16 * j, a[i][j]);
#else
    float a[4][KB] = {};
    for (int64_t d = 0; d < D; ++d)
      for (int i = 0; i < 4; ++i) {
        const float qd = Q[(r0 + i) * D + d];
        for (int64_t kk = 0; kk < KB; ++kk) a[i][kk] += qd * kT[d * ldk + kk];
      }
    for (int i = 0; i < 4; ++i) std::memcpy(lg + (r0 + i) * ld, a[i], sizeof(float) * KB);
#endif
  }
}

// acc[r, :] += sum_kk p[r * ld + kk] * vb[kk * ldv, :] for rows [0, rows) (padded to 4), keys [0, nk).
// NV = D / 16 vectors per row (0: generic loop).
template <int NV>
void tile_pv(float* __restrict acc, int64_t rows, const float* __restrict p, int64_t ld, const float* __restrict vb,
             int64_t ldv, int64_t nk, int64_t D) {
#ifdef __AVX512F__
  if constexpr (NV > 0) {
    constexpr int NR = NV >= 8 ? 2 : 4;   // rows per pass: NR x NV accumulators
    for (int64_t r0 = 0; r0 < rows; r0 += NR) {
      __m512 a[NR][NV];
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < NV; ++j) a[i][j] = _mm512_loadu_ps(acc + (r0 + i) * D + 16 * j);
      for (int64_t kk = 0; kk < nk; ++kk) {
        __m512 v[NV];
        for (int j = 0; j < NV; ++j) v[j] = _mm512_loadu_ps(vb + kk * ldv + 16 * j);
        for (int i = 0; i < NR; ++i) {
          const __m512 pk = _mm512_set1_ps(p[(r0 + i) * ld + kk]);
          for (int j = 0; j < NV; ++j) a[i][j] = _mm512_fmadd_ps(pk, v[j], a[i][j]);
        }
      }
      for (int i = 0; i < NR; ++i)
        for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc + (r0 + i) * D + 16 * j, a[i][j]);
    }
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    float* ar = acc + r * D;
    for (int64_t kk = 0; kk < nk; ++kk) {
      const float pk = p[r * ld + kk];
      const float* vr = vb + kk * ldv;
      for (int64_t d = 0; d < D; ++d) ar[d] += pk * vr[d];
    }
  }
}

// One (chunk, KV head): its context decoded once (keys divided by the balancer and transposed,
// values row-major, fp32; hi copy where tagged, else the lo codes), the chunk's raw keys
// transposed, and the score mass of each query block's voting rows.
struct ChunkHead {
  Regions region{};
  int64_t ctx = 0, T = 0, S = 0, CP = 0, TP = 0, QB = 0, nqb = 0, own_from = 0, shared_hi = 0;
  const float *q = nullptr, *kn = nullptr, *vn = nullptr;   // row 0 of the chunk (q: head h * G)
  float* out = nullptr;
  std::vector<float> kT, vc, knT, mass;   // [D, CP], [ctx, D], [D, TP], [nqb, S]
  std::vector<uint8_t> ok;                // [ctx]: 0 = evicted (no lo copy, no hi copy): weight 0
  bool any_evicted = false;
};

// Scratch of a phase-1 piece (one per thread, kept across calls).
struct PieceScratch {
  std::vector<float> xk, bal, binv;   // [D]: scratch token, the balancer and its inverse
  std::vector<uint16_t> bits;         // [D]: the balancer's fp16 bits
  std::vector<uint8_t> codes;
  std::vector<int32_t> hmap;
  std::vector<int64_t> lo_pos;
};

// The lo copies of the context positions lo_pos (codes at BITS, from the lo / s/z arrays at offsets
// lo / sz of their regions) dequantized: position p's element d to out[p * row_stride + d * col_stride],
// multiplied by mul[D] when given (keys: 1 / balancer). x [D]: scratch.
template <int BITS>
void dequant_context(const Layout& L, const Regions& region, const std::vector<int64_t>& lo_pos, int64_t lo,
                     int64_t sz, int64_t P, const float* mul, float* x, float* out, int64_t row_stride,
                     int64_t col_stride) {
  const int64_t N = L.N, D = L.D, MB = L.groups() * L.meta_bytes();
  const bool fp8 = L.group_meta == 1;
  for (const int64_t p : lo_pos) {
    const uint8_t* reg = region(p / N);
    const int64_t o = p % N;
    dequant<BITS>(reg + lo + o * P, reg + sz + o * MB, fp8, D, L.group, x);
    float* r = out + p * row_stride;
    for (int64_t d = 0; d < D; ++d) r[d * col_stride] = mul ? x[d] * mul[d] : x[d];
  }
}

// Phase 1, piece p of P of a (chunk, KV head). The balancer: computed from the first min(T, N)
// tokens at context 0 (every piece computes it; piece 0 stores it in block 0's fp16 header), read
// from the header otherwise. Then the piece's share of: the store of the chunk's tokens (lo copies,
// fresh blocks' tags cleared), the chunk's raw keys transposed (knT [D, TP]), the zeroed score mass,
// and the context decoded: kT [D, CP] (lo keys divided by the balancer), vc [ctx, D], the hi copies
// where tagged, else the lo copies (keys at k_bits, values at v_bits). Pieces write disjoint bytes:
// the store writes positions >= ctx (a block's tags are cleared only where the chunk starts it),
// the decoding reads positions < ctx.
void prefill_piece(const Layout& L, int64_t G, int64_t q_stride, int64_t kv_stride, ChunkHead& ch, int64_t p,
                   int64_t P, PieceScratch& ws) {
  const int64_t D = L.D, R = L.R, ctx = ch.ctx, T = ch.T;
  const Regions& region = ch.region;
  ws.xk.resize(D);
  ws.codes.resize(D);
  ws.bal.assign(D, 1.f);
  ws.binv.assign(D, 1.f);
  if (L.has_bal) {
    uint16_t* header = reinterpret_cast<uint16_t*>(region(0) + L.balancer);
    ws.bits.resize(D);
    if (ctx == 0) {
      balancer_to_storage(ch.q, q_stride, G, ch.kn, kv_stride, std::min(T, L.N), D, ws.bits.data());
      if (p == 0) std::memcpy(header, ws.bits.data(), sizeof(uint16_t) * D);
    } else {
      std::memcpy(ws.bits.data(), header, sizeof(uint16_t) * D);
    }
    for (int64_t d = 0; d < D; ++d) ws.bal[d] = half_to_float(ws.bits[d]);
    for (int64_t d = 0; d < D; ++d) ws.binv[d] = 1.f / ws.bal[d];
  }
  const int64_t t0 = T * p / P, t1 = T * (p + 1) / P;
  store_tokens(L, region, ctx + t0, t1 - t0, ch.kn + t0 * kv_stride, ch.vn + t0 * kv_stride, kv_stride,
               ws.bal.data(), ws.xk.data(), ws.codes.data());
  float* knT = ch.knT.data();
  for (int64_t t = t0; t < t1; ++t) {   // token-major: contiguous reads, D sequential write streams
    const float* kt = ch.kn + t * kv_stride;
    for (int64_t d = 0; d < D; ++d) knT[d * ch.TP + t] = kt[d];
  }
  if (p == P - 1)   // padding columns: keys of the last tiles past the chunk / the context
    for (int64_t d = 0; d < D; ++d) {
      std::fill(knT + d * ch.TP + T, knT + (d + 1) * ch.TP, 0.f);
      std::fill(ch.kT.data() + d * ch.CP + ctx, ch.kT.data() + (d + 1) * ch.CP, 0.f);
    }
  const int64_t m0 = ch.nqb * ch.S * p / P, m1 = ch.nqb * ch.S * (p + 1) / P;
  std::fill(ch.mass.data() + m0, ch.mass.data() + m1, 0.f);
  const int64_t c0 = ctx * p / P, c1 = ctx * (p + 1) / P;
  if (c0 == c1) return;
  std::fill(ch.ok.data() + c0, ch.ok.data() + c1, uint8_t{1});
  hi_slot_map(L, region, ctx, ch.own_from, ch.shared_hi, ws.hmap);
  ws.lo_pos.clear();
  for (int64_t q = c0; q < c1; ++q) {
    const int32_t slot = R ? ws.hmap[q] : -1;
    if (slot >= 0) {
      load_hi(hi_copy(L, region, slot, L.k_hi), L.hi_dtype, D, ws.xk.data());
      load_hi(hi_copy(L, region, slot, L.v_hi), L.hi_dtype, D, ch.vc.data() + q * D);
      for (int64_t d = 0; d < D; ++d) ch.kT[d * ch.CP + q] = ws.xk[d];
    } else if (L.has_lo()) {
      ws.lo_pos.push_back(q);
    } else {
      ch.ok[q] = 0;   // evicted: weight exactly 0
      std::memset(ch.vc.data() + q * D, 0, sizeof(float) * D);
    }
  }
  with_bits(L.k_bits, [&](auto kb) {
    constexpr int KB = decltype(kb)::value;
    if constexpr (KB > 0)
      dequant_context<KB>(L, region, ws.lo_pos, L.k_lo, L.k_sz, L.k_packed(), ws.binv.data(), ws.xk.data(),
                          ch.kT.data(), 1, ch.CP);
  });
  with_bits(L.v_bits, [&](auto vb) {
    constexpr int VB = decltype(vb)::value;
    if constexpr (VB > 0)
      dequant_context<VB>(L, region, ws.lo_pos, L.v_lo, L.v_sz, L.v_packed(), nullptr, ws.xk.data(), ch.vc.data(),
                          D, 1);
  });
}

// Phase 2: attention of query block qb (rows [qb * QB, ...)): logits over every key the rows see
// (sweep 1, key tiles of the decoded context, then the chunk's own keys), exact softmax per row, the
// score mass of the voting rows (into mass[qb]), then P @ V (sweep 2).
inline void prefill_attend(const Layout& L, int64_t G, int64_t q_stride, int64_t kv_stride, float scale,
                           int64_t vote_from, ChunkHead& ch, int64_t qb, std::vector<float>& f,
                           std::vector<float>& f2) {
  const int64_t D = L.D, ctx = ch.ctx, T = ch.T, S = ch.S, KB = kKeyTile;
  const int64_t LS = (S + KB + 15) / 16 * 16;   // logit row stride: room for a whole last tile
  const int64_t RB = (ch.QB * G + 3) / 4 * 4;   // query vectors per block, padded to 4
  f.resize(static_cast<size_t>(RB * D * 2 + RB * LS));   // lg is written before it is read: not cleared
  std::fill(f.begin(), f.begin() + RB * D * 2, 0.f);
  float* Q = f.data();        // [RB, D] q * scale
  float* acc = Q + RB * D;    // [RB, D]
  float* lg = acc + RB * D;   // [RB, LS] logits -> probabilities of the block's rows
  float* mass = ch.mass.data() + qb * S;
  const float NEG_INF = -std::numeric_limits<float>::infinity();
  const int64_t i0 = qb * ch.QB, i1 = std::min(T, i0 + ch.QB), rows = (i1 - i0) * G, kend = ctx + i1;
  for (int64_t i = i0; i < i1; ++i)
    for (int64_t g = 0; g < G; ++g) {
      const float* qr = ch.q + i * q_stride + g * D;
      float* Qr = Q + ((i - i0) * G + g) * D;
      for (int64_t d = 0; d < D; ++d) Qr[d] = qr[d] * scale;
    }
  // rows [0, r_from(j0)) see no key from j0 on (causal; rows in query order, whole 4-row groups skipped;
  // their logits there are never read, their probabilities there are set to 0 below)
  auto r_from = [&](int64_t j0) { return std::min(rows, std::max<int64_t>(0, (j0 - ctx - i0) * G) / 4 * 4); };
  for (int64_t j0 = 0, j1 = 0; j0 < kend; j0 = j1) {   // context tiles [0, ctx), then the chunk's own keys
    j1 = std::min(j0 < ctx ? ctx : kend, j0 + KB);
    if (j0 >= ctx) {
      const int64_t r0 = r_from(j0);
      tile_qk(Q + r0 * D, rows - r0, ch.knT.data() + (j0 - ctx), ch.TP, D, lg + r0 * LS + j0, LS);
      continue;
    }
    tile_qk(Q, rows, ch.kT.data() + j0, ch.CP, D, lg + j0, LS);
    if (ch.any_evicted)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t kk = j0; kk < j1; ++kk)
          if (!ch.ok[kk]) lg[r * LS + kk] = NEG_INF;
  }
  std::vector<float>& inv = f2;   // 1 / softmax sum per row: P @ V runs on exp(l - max), scaled at the end
  inv.resize(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / G, n = ctx + i + 1;   // causal: keys [0, n)
    float* lr = lg + r * LS;
    const float mx = lane_max(lr, n, NEG_INF);      // finite: the row's own key is always visible
    const float ir = inv[r] = 1.f / exp_shift_sum(lr, n, mx);
    for (int64_t j = n; j < kend; ++j) lr[j] = 0.f;
    if (i >= vote_from)   // score mass of the voting rows
      for (int64_t j = 0; j < n; ++j) mass[j] += lr[j] * ir;
  }
  for (int64_t j0 = 0, j1 = 0; j0 < kend; j0 = j1) {
    j1 = std::min(j0 < ctx ? ctx : kend, j0 + KB);
    const int64_t nk = j1 - j0;
    const float* vt = j0 >= ctx ? ch.vn + (j0 - ctx) * kv_stride : ch.vc.data() + j0 * D;
    const int64_t ldv = j0 >= ctx ? kv_stride : D;
    const int64_t r0 = r_from(j0), n = rows - r0;
    float* a = acc + r0 * D;
    const float* pr = lg + r0 * LS + j0;
    switch (D) {
      case 32: tile_pv<2>(a, n, pr, LS, vt, ldv, nk, D); break;
      case 64: tile_pv<4>(a, n, pr, LS, vt, ldv, nk, D); break;
      case 128: tile_pv<8>(a, n, pr, LS, vt, ldv, nk, D); break;
      default: tile_pv<0>(a, n, pr, LS, vt, ldv, nk, D); break;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = i0 + r / G, g = r % G;
    float* o = ch.out + i * q_stride + g * D;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[r * D + d] * inv[r];
  }
}

// Phase 3: the score mass summed over the query blocks, the hi slots' scores, the hi-set upkeep.
inline void prefill_finish(const Layout& L, const Selection& sel, int64_t kv_stride, ChunkHead& ch,
                           UpkeepScratch& ws) {
  float* mass = ch.mass.data();
  for (int64_t b = 1; b < ch.nqb; ++b)
    for (int64_t p = 0; p < ch.S; ++p) mass[p] += ch.mass[b * ch.S + p];
  // 6. scores of the hi slots (the chunk's tokens hold no slot yet: their mass goes to the selection),
  // 7. hi-set upkeep over the tagged and the chunk's tokens
  update_hi_set(L, sel, ch.region, ch.ctx, ch.T, ch.own_from, mass, ch.kn, ch.vn, kv_stride, true, ws);
}

// f(k) for every task k of n, handed out to the threads one at a time in index order: a thread that
// finishes early takes the next one, so when the list ends on small tasks the threads finish close
// together. Without threads (or nested) the loop runs them all inline.
template <class F>
void for_each_dynamic(int64_t n, F&& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(k);
  });
}

}  // namespace

namespace mikv {

// All multi-token chunks of one step: chunk c covers rows [rows[c,0], rows[c,1]) of q/k/v at
// positions [ctx[c], ctx[c] + T). Returns out [Tq, Hq, D] fp32 (rows outside every chunk are 0).
torch::Tensor prefill_step(torch::Tensor regions, const Layout& L, torch::Tensor block_tables,
                           torch::Tensor ctx, torch::Tensor rows, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                           double scale, double hi_ratio, int64_t sink_tokens, int64_t recent_window,
                           int64_t obs_window, torch::Tensor own_from, torch::Tensor shared_hi) {
  const StepTensors st = check_step_tensors(L, regions, block_tables, q, k, v, own_from, shared_hi);
  TORCH_CHECK(ctx.scalar_type() == torch::kInt64 && ctx.dim() == 1 && ctx.is_contiguous(), "mikv_cpu: ctx int64 [C]");
  TORCH_CHECK(rows.scalar_type() == torch::kInt64 && rows.dim() == 2 && rows.size(1) == 2 && rows.is_contiguous(),
              "mikv_cpu: rows int64 [C, 2]");
  const int64_t Tq = q.size(0), H = st.H, G = st.G, Hq = H * G, D = L.D, C = ctx.size(0), M = st.M;
  TORCH_CHECK(block_tables.size(0) == C && rows.size(0) == C, "mikv_cpu: block_tables / rows need C = ", C, " rows");
  const int64_t* cp = ctx.data_ptr<int64_t>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    const int64_t s = rp[2 * c], e = rp[2 * c + 1];
    TORCH_CHECK(0 <= s && s <= e && e <= Tq, "mikv_cpu: chunk rows [", s, ", ", e, ") outside [0, ", Tq, ")");
    check_row(L, st.block_tables + c * M, M, regions.size(0), cp[c], cp[c] + e - s - 1, st.own_from[c]);
  }
  const Selection sel = checked_selection(hi_ratio, sink_tokens, recent_window);
  auto out = torch::empty({Tq, Hq, D}, q.options());   // every chunk row is written; the others are zeroed here
  float* op = out.data_ptr<float>();
  {
    std::vector<uint8_t> covered(static_cast<size_t>(Tq), 0);
    for (int64_t c = 0; c < C; ++c) std::fill(covered.begin() + rp[2 * c], covered.begin() + rp[2 * c + 1], uint8_t{1});
    for (int64_t t = 0; t < Tq; ++t)
      if (!covered[t]) std::fill(op + t * Hq * D, op + (t + 1) * Hq * D, 0.f);
  }
  const float sc = static_cast<float>(scale);
  // (chunk, KV head) pairs with rows, and their query blocks (at most kLogitBudget logits each); the
  // pairs' buffers are kept across calls (per calling thread), so a step allocates no fresh pages
  thread_local std::vector<ChunkHead> pool;
  std::vector<ChunkHead>& heads = pool;   // the lambdas below run on other threads: not the thread_local itself
  std::vector<std::pair<int64_t, int64_t>> blocks;   // (index into heads, query block)
  int64_t NH = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t s = rp[2 * c], T = rp[2 * c + 1] - s;
    if (T == 0) continue;
    for (int64_t h = 0; h < H; ++h) {
      if (static_cast<int64_t>(heads.size()) <= NH) heads.emplace_back();
      ChunkHead& ch = heads[NH];
      ch.region = Regions{st.regions, st.block_tables + c * M, H, h, L.region_bytes};
      ch.ctx = cp[c];
      ch.T = T;
      ch.S = cp[c] + T;
      ch.CP = (cp[c] + kKeyTile - 1) / kKeyTile * kKeyTile;
      ch.TP = (T + kKeyTile - 1) / kKeyTile * kKeyTile;
      const int64_t LS = (ch.S + kKeyTile + 15) / 16 * 16;
      ch.QB = std::max<int64_t>(1, std::min(kQueryVecs, kLogitBudget / LS) / G);
      ch.nqb = (T + ch.QB - 1) / ch.QB;
      ch.own_from = st.own_from[c];
      ch.shared_hi = st.shared_hi[c];
      ch.q = st.q + (s * Hq + h * G) * D;
      ch.kn = st.k + (s * H + h) * D;
      ch.vn = st.v + (s * H + h) * D;
      ch.out = op + (s * Hq + h * G) * D;
      ch.kT.resize(static_cast<size_t>(D) * ch.CP);   // filled by the phase-1 pieces
      ch.vc.resize(static_cast<size_t>(ch.ctx) * D);
      ch.ok.resize(ch.ctx);
      ch.knT.resize(static_cast<size_t>(D) * ch.TP);
      ch.mass.resize(static_cast<size_t>(ch.nqb) * ch.S);
      for (int64_t b = ch.nqb - 1; b >= 0; --b) blocks.emplace_back(NH, b);
      ++NH;
    }
  }
  const int64_t NB = static_cast<int64_t>(blocks.size());
  const int64_t q_stride = Hq * D, kv_stride = H * D;
  // phase 1 in P pieces per pair when there are fewer pairs than two per thread (one prompt's KV heads)
  const int64_t threads = at::get_num_threads();
  const int64_t P = NH < 2 * threads ? threads : 1;
  at::parallel_for(0, NH * P, 1, [&](int64_t begin, int64_t end) {
    thread_local PieceScratch ws;
    for (int64_t k = begin; k < end; ++k) prefill_piece(L, G, q_stride, kv_stride, heads[k / P], k % P, P, ws);
  });
  for (int64_t i = 0; i < NH; ++i)
    heads[i].any_evicted = std::find(heads[i].ok.begin(), heads[i].ok.end(), 0) != heads[i].ok.end();
  // query blocks pair by pair (their keys stay in cache), each pair's last (costliest: causal) first,
  // so the step ends on small blocks
  for_each_dynamic(NB, [&](int64_t k) {
    thread_local std::vector<float> f, f2;
    const auto [i, b] = blocks[k];
    ChunkHead& ch = heads[i];
    const int64_t T = ch.T;
    const int64_t vote_from = !L.R ? T : (obs_window >= 0 && T > 1) ? std::max<int64_t>(0, T - obs_window) : 0;
    prefill_attend(L, G, q_stride, kv_stride, sc, vote_from, ch, b, f, f2);
  });
  at::parallel_for(0, NH, 1, [&](int64_t begin, int64_t end) {
    thread_local UpkeepScratch ws;
    for (int64_t i = begin; i < end; ++i) prefill_finish(L, sel, kv_stride, heads[i], ws);
  });
  size_t kept = 0;   // the pairs' buffers stay for the next call, up to kKeptBytes (a long step's are freed)
  for (const ChunkHead& ch : heads)
    kept += (ch.kT.capacity() + ch.vc.capacity() + ch.knT.capacity() + ch.mass.capacity()) * sizeof(float) +
            ch.ok.capacity();
  if (kept > kKeptBytes) std::vector<ChunkHead>().swap(heads);
  return out;
}

}  // namespace mikv
