// The page layout of one (block, KV head) region as the C++ ops read it (core/layout.py), its checks,
// and the per-slot sub-arrays. Header-only (internal linkage), as every mikv_*.h.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace mikv {

// Page layout (byte offsets inside one (block, KV head) region), see core/layout.py:
// [K_lo N*Pk][V_lo N*Pv][K s/z][V s/z][tag R i32][score R f32][K_hi R*D][V_hi R*D][balancer D fp16][pad].
// `score` holds one fp32 per hi slot (the accumulated mass of the slot's token, meaningful while the
// slot's tag is set), not one per position. Built from named fields and checked once (checked_layout,
// the Python binding's constructor); the ops trust it. Outside the anonymous namespace: one type for
// the binding and every op source.
struct __attribute__((visibility("hidden"))) Layout {   // hidden: as pybind11's own types
  int64_t N, D, bits, group, R, region_bytes;
  int64_t k_lo, v_lo, k_sz, v_sz, score, tag, k_hi, v_hi, balancer;
  int64_t hi_dtype;     // 0 fp16, 1 bf16, 2 fp32, 3 fp8 e4m3fn
  int64_t score_dtype;  // 0 fp32 (the only score dtype; config.SCORE_DTYPES)
  bool has_bal;
  int64_t packed() const { return D * bits / 8; }
  int64_t groups() const { return bits ? D / group : 0; }
  int64_t hi_elem() const { return hi_dtype == 2 ? 4 : hi_dtype == 3 ? 1 : 2; }  // bytes of one hi element
};

}  // namespace mikv

namespace {

using mikv::Layout;

// Every sub-array lies inside the region and starts aligned for its element type, so no tag, slot,
// code or header read through a valid block id can leave its region (the ops trust these offsets
// in their inner loops).
inline void check_layout_extents(const Layout& l) {
  TORCH_CHECK(l.N > 0 && l.D > 0 && l.R >= 0 && l.R <= l.N && l.region_bytes > 0 && (l.bits == 0 || l.group > 0),
              "mikv_cpu: bad layout (block ", l.N, ", head_dim ", l.D, ", slots ", l.R, ", group ", l.group,
              ", region ", l.region_bytes, " bytes)");
  const int64_t hi = l.D * l.hi_elem();
  const int64_t sz = l.bits ? l.N * (l.D / l.group) * 4 : 0;
  const struct { const char* name; int64_t off, bytes, align; } parts[] = {
      {"k_lo", l.k_lo, l.N * l.D * l.bits / 8, 1}, {"v_lo", l.v_lo, l.N * l.D * l.bits / 8, 1},
      {"k_sz", l.k_sz, sz, 2}, {"v_sz", l.v_sz, sz, 2}, {"tag", l.tag, l.R * 4, 4}, {"score", l.score, l.R * 4, 4},
      {"k_hi", l.k_hi, l.R * hi, l.hi_elem()}, {"v_hi", l.v_hi, l.R * hi, l.hi_elem()},
      {"balancer", l.balancer, l.has_bal ? l.D * 2 : 0, 2}};
  for (const auto& p : parts) {
    TORCH_CHECK(p.bytes == 0 || (p.off >= 0 && p.off + p.bytes <= l.region_bytes),
                "mikv_cpu: layout puts ", p.name, " (", p.bytes, " bytes at offset ", p.off,
                ") outside the region of ", l.region_bytes, " bytes");
    TORCH_CHECK(p.bytes == 0 || p.off % p.align == 0, "mikv_cpu: layout puts ", p.name, " at offset ", p.off,
                ", not a multiple of its element size ", p.align);
  }
}

// The checks of a layout's fields: known widths and dtype codes, head_dim and group that the codes
// tile, 4-byte aligned regions, every sub-array inside its region.
inline Layout checked_layout(const Layout& l) {
  TORCH_CHECK(l.bits == 0 || l.bits == 2 || l.bits == 3 || l.bits == 4 || l.bits == 8, "mikv_cpu: bits ", l.bits);
  TORCH_CHECK(l.bits == 0 || (l.D % 8 == 0 && l.group > 0 && l.D % l.group == 0), "mikv_cpu: head_dim ", l.D,
              " group ", l.group);
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

// The regions (block row[j], KV head h) of one request's blocks j = 0, 1, ...
struct Regions {
  uint8_t* base;
  const int32_t* row;
  int64_t H, h, bytes;
  uint8_t* operator()(int64_t j) const { return base + (static_cast<int64_t>(row[j]) * H + h) * bytes; }
};

// Hi copy (K: off = L.k_hi, V: off = L.v_hi) of hi slot j * R + r of a request's regions.
inline const uint8_t* hi_copy(const Layout& L, const Regions& region, int64_t slot, int64_t off) {
  return region(slot / L.R) + off + (slot % L.R) * L.D * L.hi_elem();
}

}  // namespace
