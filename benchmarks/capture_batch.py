"""Cost of a CUDA-graph-capture-shaped batch (512 one-token rows at context 0) vs one decode step
of 512 requests at a given context, per layer, on the same op set, side by side in one run.

    python benchmarks/capture_batch.py [--ops torch|cpu] [--ctx 512] [--rows 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", default="torch", choices=("torch", "cpu"))
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ["MIKV_VLLM_OPS"] = args.ops
    from mikv_vllm.config import preset
    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.ops import get_ops

    ops, cfg, n, d, hq, hkv = get_ops("cpu"), preset("mikv"), 128, 64, 9, 3
    lay = RegionLayout.build(cfg, n, d)
    nb = args.ctx // n + 1
    regions = torch.zeros(args.rows * nb, hkv, lay.region_bytes, dtype=torch.uint8)
    table = torch.arange(args.rows * nb, dtype=torch.int32).view(args.rows, nb)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(args.rows, h, d, generator=gen) for h in (hq, hkv, hkv))
    scale = 1 / math.sqrt(d)
    # a context of args.ctx tokens per request: one prefill chunk each (not timed)
    for i in range(args.rows):
        qq, kk, vv = (torch.randn(args.ctx, h, d, generator=gen) for h in (hq, hkv, hkv))
        ops.forward_request(regions, lay, cfg, table[i], 0, qq, kk, vv, scale)

    def timed(pos):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ops.forward_decode(regions, lay, cfg, table, pos, q, k, v, scale)
            best = min(best, time.perf_counter() - t0)
        return best

    decode = timed(torch.full((args.rows,), args.ctx, dtype=torch.int64))
    capture = timed(torch.zeros(args.rows, dtype=torch.int64))
    print(f"ops {args.ops}: {args.rows} rows at context 0: {1e3 * capture:.1f} ms; {args.rows}-request decode "
          f"step at context {args.ctx}: {1e3 * decode:.1f} ms; ratio {capture / decode:.2f}x (per layer, best of "
          f"{args.repeats})")


if __name__ == "__main__":
    main()
