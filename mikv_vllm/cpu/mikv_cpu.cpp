// Python bindings of the MiKV C++ CPU ops (sources: mikv_decode.cpp, mikv_prefill.cpp; shared code:
// mikv_*.h).
#include <torch/extension.h>

#include <string>
#include <vector>

#include "mikv_fp.h"
#include "mikv_layout.h"

namespace py = pybind11;

#ifndef MIKV_ISA
#define MIKV_ISA unknown
#endif
#define MIKV_STR_(x) #x
#define MIKV_STR(x) MIKV_STR_(x)

namespace mikv {
torch::Tensor decode_step(torch::Tensor regions, const Layout& L, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store, bool upkeep, double hi_ratio, int64_t sink_tokens, int64_t recent_window,
                          torch::Tensor own_from, torch::Tensor shared_hi);
torch::Tensor prefill_step(torch::Tensor regions, const Layout& L, torch::Tensor block_tables,
                           torch::Tensor ctx, torch::Tensor rows, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                           double scale, double hi_ratio, int64_t sink_tokens, int64_t recent_window,
                           int64_t obs_window, torch::Tensor own_from, torch::Tensor shared_hi);
}  // namespace mikv

namespace {
// Hi-tier conversions of mikv_fp.h (store_hi then load_hi), exposed for tests: x float32 [M, D].
std::vector<torch::Tensor> hi_roundtrip(torch::Tensor x, int64_t dtype) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "hi_roundtrip: x float32 [M, D]");
  TORCH_CHECK(dtype >= 0 && dtype <= 3, "hi_roundtrip: dtype code ", dtype);
  const int64_t M = x.size(0), D = x.size(1), es = dtype == 2 ? 4 : dtype == 3 ? 1 : 2;
  auto raw = torch::empty({M, D * es}, x.options().dtype(torch::kUInt8));
  auto back = torch::empty_like(x);
  for (int64_t i = 0; i < M; ++i) {
    store_hi(raw.data_ptr<uint8_t>() + i * D * es, dtype, D, x.data_ptr<float>() + i * D);
    load_hi(raw.data_ptr<uint8_t>() + i * D * es, dtype, D, back.data_ptr<float>() + i * D);
  }
  return {raw, back};
}

// The Python class Layout: keyword fields only, checked once here (checked_layout); module-local, as
// every ISA variant's module registers its own.
void bind_layout(py::module_& m) {
  py::class_<Layout>(m, "Layout", py::module_local(),
                     "The page layout of one (block, KV head) region (core.layout.RegionLayout), checked at "
                     "construction: byte offsets of the sub-arrays, key and value widths, dtype codes (hi 0 fp16, "
                     "1 bf16, 2 fp32, 3 fp8 e4m3fn; score 0 fp32; group meta 0 fp16, 1 fp8-scale)")
      .def(py::init([](int64_t block_size, int64_t head_dim, int64_t k_bits, int64_t v_bits, int64_t group,
                       int64_t hi_slots, int64_t region_bytes, int64_t k_lo, int64_t v_lo, int64_t k_sz, int64_t v_sz,
                       int64_t tag, int64_t score, int64_t k_hi, int64_t v_hi, int64_t balancer, int64_t hi_dtype,
                       int64_t score_dtype, int64_t group_meta, bool has_balancer) {
             return checked_layout(Layout{block_size, head_dim, k_bits, v_bits, group, hi_slots, region_bytes, k_lo,
                                          v_lo, k_sz, v_sz, score, tag, k_hi, v_hi, balancer, hi_dtype, score_dtype,
                                          group_meta, has_balancer});
           }),
           py::kw_only(), py::arg("block_size"), py::arg("head_dim"), py::arg("k_bits"), py::arg("v_bits"),
           py::arg("group"), py::arg("hi_slots"), py::arg("region_bytes"), py::arg("k_lo"), py::arg("v_lo"),
           py::arg("k_sz"), py::arg("v_sz"), py::arg("tag"), py::arg("score"), py::arg("k_hi"), py::arg("v_hi"),
           py::arg("balancer"), py::arg("hi_dtype"), py::arg("score_dtype"), py::arg("group_meta"),
           py::arg("has_balancer"))
      .def_readonly("block_size", &Layout::N)
      .def_readonly("head_dim", &Layout::D)
      .def_readonly("k_bits", &Layout::k_bits)
      .def_readonly("v_bits", &Layout::v_bits)
      .def_readonly("group_meta", &Layout::group_meta)
      .def_readonly("hi_slots", &Layout::R)
      .def_readonly("region_bytes", &Layout::region_bytes);
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  bind_layout(m);
  m.def("decode_step", &mikv::decode_step,
        "MiKV decode step (store + attention + score accumulation + hi-set upkeep when `upkeep`, with "
        "hi_ratio, sink_tokens, recent_window (-1: half the budget); own_from / shared_hi [B]: shared prefix "
        "columns, read-only) for B requests, one token each");
  m.def("hi_roundtrip", &hi_roundtrip, "store_hi + load_hi of x [M, D] float32 (tests): (raw bytes, values)");
  m.def("prefill_step", &mikv::prefill_step,
        "MiKV prefill step: every multi-token chunk of a step (balancer, store, attention, scores, hi upkeep; "
        "own_from / shared_hi [C]: shared prefix columns, read-only)");
  // this variant (build.py's -DMIKV_ISA) and the SIMD macros its flags defined (tests check both)
  m.attr("ISA") = MIKV_STR(MIKV_ISA);
  std::vector<std::string> simd;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  simd.push_back("avx512");
#endif
#if defined(__AVX512VNNI__)
  simd.push_back("avx512vnni");
#endif
#if defined(__AVX512VBMI__)
  simd.push_back("avx512vbmi");
#endif
#if defined(__AVX2__) && defined(__FMA__)
  simd.push_back("avx2");
#endif
#if defined(__F16C__)
  simd.push_back("f16c");
#endif
#if defined(__ARM_NEON)
  simd.push_back("neon");
#endif
  m.attr("SIMD") = simd;
}
