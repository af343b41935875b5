"""The engine test's perplexity probe for several configs, one engine after the other.

Mean NLL of one 1024-token prose window (the quality harness's corpus) prefilled in 16-token
chunks, so almost every token attends to the compressed cache; prints the PPL ratio to stock.
This is how tests/engine/test_offline_policy.py's PPL_BOUND was chosen:

    python benchmarks/ppl_probe.py stock mikv rtn-int3 mikv-int2-r0.1
"""

from __future__ import annotations

import argparse
import math
import time

CONFIGS = {
    "stock": (None, None),
    "mikv": ("mikv", None),
    "mikv-paper": ("mikv", "mikv-paper"),
    "rtn-int3": ("rtn", {"lo_bits": 3}),
    "rtn-int4": ("rtn", "rtn-int4"),
    "mikv-int2-r0.1": ("mikv", {"lo_bits": 2, "hi_ratio": 0.1}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", choices=sorted(CONFIGS))
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args()

    from mikv_vllm.eval.engine import offline_engine, prose_nll
    from mikv_vllm.model import prepare_model

    model = prepare_model(progress=False)
    nll = {}
    for name in args.configs:
        policy, mikv = CONFIGS[name]
        t0 = time.time()
        with offline_engine(model, policy, mikv, max_num_batched_tokens=args.chunk, enable_chunked_prefill=True,
                            max_num_seqs=1, max_model_len=2 * args.length) as llm:
            nll[name] = prose_nll(llm, args.length, args.chunk)
        print(f"{name}: mean NLL {nll[name]:.4f}, PPL {math.exp(nll[name]):.3f} ({time.time() - t0:.0f} s)", flush=True)
    if "stock" in nll:
        for name, value in nll.items():
            print(f"{name}: PPL ratio {math.exp(value - nll['stock']):.4f}")


if __name__ == "__main__":
    main()
