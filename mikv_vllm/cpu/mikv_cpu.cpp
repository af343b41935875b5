// Python bindings of the MiKV C++ CPU ops (sources: mikv_decode.cpp; shared code: mikv_common.h).
#include <torch/extension.h>

#include "mikv_common.h"

namespace mikv {
torch::Tensor decode_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store, bool upkeep, double hi_ratio, int64_t sink_tokens, int64_t recent_window);
}  // namespace mikv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &mikv::decode_step,
        "MiKV decode step (store + attention + score accumulation + hi-set upkeep when `upkeep`, with "
        "hi_ratio, sink_tokens, recent_window (-1: half the budget)) for B requests, one token each");
  m.attr("META_LEN") = kMetaLen;
}
