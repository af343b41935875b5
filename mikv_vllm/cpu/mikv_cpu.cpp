// Python bindings of the MiKV C++ CPU ops (sources: mikv_decode.cpp, mikv_prefill.cpp; shared code:
// mikv_*.h).
#include <torch/extension.h>

#include <string>
#include <vector>

#include "mikv_fp.h"
#include "mikv_layout.h"

#ifndef MIKV_ISA
#define MIKV_ISA unknown
#endif
#define MIKV_STR_(x) #x
#define MIKV_STR(x) MIKV_STR_(x)

namespace mikv {
torch::Tensor decode_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store, bool upkeep, double hi_ratio, int64_t sink_tokens, int64_t recent_window,
                          torch::Tensor own_from, torch::Tensor shared_hi);
torch::Tensor prefill_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
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
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &mikv::decode_step,
        "MiKV decode step (store + attention + score accumulation + hi-set upkeep when `upkeep`, with "
        "hi_ratio, sink_tokens, recent_window (-1: half the budget); own_from / shared_hi [B]: shared prefix "
        "columns, read-only) for B requests, one token each");
  m.def("hi_roundtrip", &hi_roundtrip, "store_hi + load_hi of x [M, D] float32 (tests): (raw bytes, values)");
  m.def("prefill_step", &mikv::prefill_step,
        "MiKV prefill step: every multi-token chunk of a step (balancer, store, attention, scores, hi upkeep; "
        "own_from / shared_hi [C]: shared prefix columns, read-only)");
  m.attr("META_LEN") = kMetaLen;
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
