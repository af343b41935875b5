// Python bindings of the MiKV C++ CPU ops (sources: mikv_decode.cpp, mikv_prefill.cpp; shared code:
// mikv_common.h).
#include <torch/extension.h>

#include "mikv_common.h"

namespace mikv {
torch::Tensor decode_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store);
torch::Tensor prefill_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
                           torch::Tensor ctx, torch::Tensor rows, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                           double scale, double hi_ratio, int64_t sink_tokens, int64_t recent_window,
                           int64_t obs_window);
}  // namespace mikv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &mikv::decode_step,
        "MiKV decode step (store + attention + score accumulation) for B requests, one token each");
  m.def("prefill_step", &mikv::prefill_step,
        "MiKV prefill step: every multi-token chunk of a step (balancer, store, attention, scores, hi upkeep)");
  m.attr("META_LEN") = kMetaLen;
}
