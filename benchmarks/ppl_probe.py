"""The engine test's perplexity probe for several configs, one engine after the other.

Mean NLL of one 1024-token prose window (the quality harness's corpus) prefilled in 16-token
chunks, so almost every token attends to the compressed cache; prints the PPL ratio to stock
and each config's page bytes per token per KV head. This is how tests/engine/test_offline_policy.py's
PPL_BOUND was chosen:

    python benchmarks/ppl_probe.py stock mikv rtn-int3 mikv-int2-r0.1

A config is a name below or anything ``--mikv-config`` takes (a preset, inline JSON, a YAML file):

    python benchmarks/ppl_probe.py stock mikv-int3-r0.05-g64-fp8-rot '{"preset": "rtn-int4", "rotation": true}'
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
    # page formats (issue 14): one group per head vector (64), fp8 hi copies, Hadamard rotation
    "rtn-int4-g64": ("rtn", {"preset": "rtn-int4", "group_size": 64}),
    "rtn-int4-g64-rot": ("rtn", {"preset": "rtn-int4", "group_size": 64, "rotation": True}),
    "mikv-int3-r0.05-g64-fp8": ("mikv", {"lo_bits": 3, "hi_ratio": 0.05, "group_size": 64,
                                         "hi_dtype": "float8_e4m3fn"}),
    "mikv-int3-r0.05-g64-fp8-rot": ("mikv", {"lo_bits": 3, "hi_ratio": 0.05, "group_size": 64,
                                             "hi_dtype": "float8_e4m3fn", "rotation": True}),
    "mikv-int2-r0.1-g64-fp8-rot": ("mikv", {"lo_bits": 2, "hi_ratio": 0.1, "group_size": 64,
                                            "hi_dtype": "float8_e4m3fn", "rotation": True}),
}


def _resolve(text: str):
    """(policy, mikv section) of a CONFIGS name or a ``--mikv-config`` value."""
    if text in CONFIGS:
        return CONFIGS[text]
    from mikv_vllm.config import MiKVConfig

    config = MiKVConfig.parse(text)
    return config.policy, config.to_dict()


def _bytes(llm, policy, mikv) -> str:
    """Page bytes per token per KV head of the engine (the model dtype's dense K+V for stock)."""
    from mikv_vllm.config import MiKVConfig
    from mikv_vllm.core.layout import RegionLayout

    vc = llm.llm_engine.vllm_config
    d, n = vc.model_config.get_head_size(), vc.cache_config.block_size
    if policy is None:
        return f"{2 * d * vc.model_config.dtype.itemsize} B/token/head (dense {vc.model_config.dtype})"
    section = {"preset": mikv} if isinstance(mikv, str) else mikv
    config = MiKVConfig.from_dict(section, policy=policy)
    return f"{RegionLayout.build(config, n, d).content_bytes} B/token/head (head_dim {d}, block {n})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help=f"names {sorted(CONFIGS)} or --mikv-config values")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=16)
    args = ap.parse_args()

    from mikv_vllm.eval.engine import offline_engine, prose_nll
    from mikv_vllm.model import prepare_model

    model = prepare_model(progress=False)
    nll = {}
    for name in args.configs:
        policy, mikv = _resolve(name)
        t0 = time.time()
        with offline_engine(model, policy, mikv, max_num_batched_tokens=args.chunk, enable_chunked_prefill=True,
                            max_num_seqs=1, max_model_len=2 * args.length) as llm:
            nll[name] = prose_nll(llm, args.length, args.chunk)
            size = _bytes(llm, policy, mikv)
        print(f"{name}: mean NLL {nll[name]:.4f}, PPL {math.exp(nll[name]):.3f}, {size} ({time.time() - t0:.0f} s)",
              flush=True)
    if "stock" in nll:
        for name, value in nll.items():
            print(f"{name}: PPL ratio {math.exp(value - nll['stock']):.4f}")


if __name__ == "__main__":
    main()
