// The page layout of one (block, KV head) region as the C++ ops read it (core/layout.py), its checks,
// and the per-slot sub-arrays. Header-only (internal linkage), as every mikv_*.h.
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace mikv {

// Page layout (byte offsets inside one (block, KV head) region), see core/layout.py:
// [K_lo N*Pk][V_lo N*Pv][K s/z][V s/z][tag R i32][score R f32][K_hi R*D][V_hi R*D][balancer D fp16][pad].
// Keys are stored at k_bits, values at v_bits (Pk = D*k_bits/8, Pv = D*v_bits/8; both 0: eviction).
// s/z: one record per (token, group) of group_meta's format (mikv_codes.h Meta).
// `score` holds one fp32 per hi slot (the accumulated mass of the slot's token, meaningful while the
// slot's tag is set), not one per position. Built from named fields and checked once (checked_layout,
// the Python binding's constructor); the ops trust it. Outside the anonymous namespace: one type for
// the binding and every op source.
struct __attribute__((visibility("hidden"))) Layout {   // hidden: as pybind11's own types
  int64_t N, D, k_bits, v_bits, group, R, region_bytes;
  int64_t k_lo, v_lo, k_sz, v_sz, score, tag, k_hi, v_hi, balancer;
  int64_t hi_dtype;     // 0 fp16, 1 bf16, 2 fp32, 3 fp8 e4m3fn
  int64_t score_dtype;  // 0 fp32 (the only score dtype; config.SCORE_DTYPES)
  int64_t group_meta;   // 0 fp16 (scale, zero), 1 fp8-scale (e5m2 scale, fp16 zero; core.quant.pack_meta)
  bool has_bal;
  bool has_lo() const { return k_bits > 0; }
  int64_t k_packed() const { return D * k_bits / 8; }
  int64_t v_packed() const { return D * v_bits / 8; }
  int64_t groups() const { return k_bits ? D / group : 0; }
  int64_t meta_bytes() const { return group_meta == 1 ? 3 : 4; }   // core.layout.META_BYTES
  int64_t hi_elem() const { return hi_dtype == 2 ? 4 : hi_dtype == 3 ? 1 : 2; }  // bytes of one hi element
};

}  // namespace mikv

namespace {

using mikv::Layout;

// Every sub-array lies inside the region and starts aligned for its element type, so no tag, slot,
// code or header read through a valid block id can leave its region (the ops trust these offsets
// in their inner loops).
inline void check_layout_extents(const Layout& l) {
  TORCH_CHECK(l.N > 0 && l.D > 0 && l.R >= 0 && l.R <= l.N && l.region_bytes > 0 && (!l.has_lo() || l.group > 0),
              "mikv_cpu: bad layout (block ", l.N, ", head_dim ", l.D, ", slots ", l.R, ", group ", l.group,
              ", region ", l.region_bytes, " bytes)");
  const int64_t hi = l.D * l.hi_elem();
  const int64_t sz = l.N * l.groups() * l.meta_bytes(), sz_align = l.group_meta == 1 ? 1 : 2;
  const struct { const char* name; int64_t off, bytes, align; } parts[] = {
      {"k_lo", l.k_lo, l.N * l.k_packed(), 1}, {"v_lo", l.v_lo, l.N * l.v_packed(), 1},
      {"k_sz", l.k_sz, sz, sz_align}, {"v_sz", l.v_sz, sz, sz_align}, {"tag", l.tag, l.R * 4, 4},
      {"score", l.score, l.R * 4, 4},
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

// The checks of a layout's fields: known widths (keys and values both evicted or both kept) and
// codes, head_dim and group that the codes tile, 4-byte aligned regions, every sub-array inside its region.
inline Layout checked_layout(const Layout& l) {
  for (const int64_t b : {l.k_bits, l.v_bits})
    TORCH_CHECK(b == 0 || b == 2 || b == 3 || b == 4 || b == 8, "mikv_cpu: k_bits ", l.k_bits, " v_bits ", l.v_bits,
                " (each 0, 2, 3, 4 or 8)");
  TORCH_CHECK((l.k_bits == 0) == (l.v_bits == 0), "mikv_cpu: k_bits ", l.k_bits, " v_bits ", l.v_bits,
              " (keys and values are both evicted or both kept)");
  TORCH_CHECK(!l.has_lo() || (l.D % 8 == 0 && l.group > 0 && l.D % l.group == 0), "mikv_cpu: head_dim ", l.D,
              " group ", l.group);
  TORCH_CHECK(l.group_meta == 0 || l.group_meta == 1, "mikv_cpu: group meta code ", l.group_meta,
              " (0 fp16, 1 fp8-scale)");
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
