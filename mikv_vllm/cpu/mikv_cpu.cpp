// Python bindings of the MiKV C++ CPU ops (sources: mikv_decode.cpp; shared code: mikv_common.h).
#include <torch/extension.h>

#include "mikv_common.h"

namespace mikv {
torch::Tensor decode_step(torch::Tensor regions, std::vector<int64_t> meta, torch::Tensor block_tables,
                          torch::Tensor pos, torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                          bool do_store, torch::Tensor own_from, torch::Tensor shared_hi);
}  // namespace mikv

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_step", &mikv::decode_step,
        "MiKV decode step (store + attention + score accumulation) for B requests, one token each");
  m.attr("META_LEN") = kMetaLen;
}
