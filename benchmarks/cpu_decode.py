"""CPU decode step: per-request loop vs the batched step (core.reference), side by side.

Per layer and decode step, B requests of L context tokens each (head_dim 64, 3 KV heads,
9 query heads, block 128: the embedded model's shape). Prints ms per step and the ratio.

Usage: python benchmarks/cpu_decode.py [--preset mikv] [--context 512] [--batch 1 8 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout

N, D, H, HQ = 128, 64, 3, 9


def run(config: MiKVConfig, context: int, batch: int, steps: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    layout = RegionLayout.build(config, N, D)
    per_req = (context + steps * 2) // N + 1
    regions = torch.zeros(batch * per_req, H, layout.region_bytes, dtype=torch.uint8)
    table = torch.arange(batch * per_req, dtype=torch.int32).reshape(batch, per_req)
    for i in range(batch):
        q, k, v = (torch.randn(context, h, D, generator=gen) for h in (HQ, H, H))
        ref.forward_request(regions, layout, config, table[i], 0, q, k, v, D ** -0.5)
    q, k, v = (torch.randn(batch, h, D, generator=gen) for h in (HQ, H, H))
    t0 = time.perf_counter()
    for s in range(steps):
        for i in range(batch):
            ref.forward_request(regions, layout, config, table[i], context + s, q[i:i + 1], k[i:i + 1],
                                v[i:i + 1], D ** -0.5)
    t1 = time.perf_counter()
    for s in range(steps):
        tdec.forward_decode(regions, layout, config, table, [context + steps + s] * batch, q, k, v, D ** -0.5)
    t2 = time.perf_counter()
    return 1e3 * (t1 - t0) / steps, 1e3 * (t2 - t1) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mikv")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    config = MiKVConfig.parse(args.preset)
    print("| preset | context | batch | loop ms/step/layer | batched ms/step/layer | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for b in args.batch:
        loop, batched = run(config, args.context, b, args.steps)
        print(f"| {args.preset} | {args.context} | {b} | {loop:.1f} | {batched:.1f} | {loop / batched:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
