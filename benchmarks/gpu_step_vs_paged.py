"""MiKV's decode step (store + hi map + split-K + merge + scores + upkeep: ``kernels.step``) vs
vLLM's paged decode (``vllm.v1.attention.ops.triton_unified_attention.unified_attention`` on a
bf16 cache), same batch, same block tables, on one GPU: eager and CUDA-graph replay times, and
the JIT compile time of MiKV's step (first call, per preset). Needs CUDA; ``--dry-run`` prints
the plan and exits 0.

    python benchmarks/gpu_step_vs_paged.py [--presets mikv mikv-int3-r05] [--contexts 1024 4096 8192]
        [--batches 1 32] [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--block-size 16] [--iters 50]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _pages(cfg, layout, hkv, rows, ctx, gen):
    """Pages as after a long run: sane lo (scale, zero), balancer 1, the hi budget tagged per
    (row, KV head) at random positions with random scores and hi copies."""
    from mikv_vllm.core.importance import hi_budget

    n, r = layout.block_size, layout.hi_slots
    cols = ctx // n + 2
    regions = torch.randint(0, 256, (rows * cols + 1, hkv, layout.region_bytes), dtype=torch.uint8, device="cuda",
                            generator=gen)
    v = layout.views(regions)
    if layout.bits:
        for sz in (v.k_sz, v.v_sz):
            sz[..., 0].uniform_(0.01, 0.1, generator=gen)
            sz[..., 1].uniform_(-0.3, -0.1, generator=gen)
    if layout.has_balancer:
        v.balancer.fill_(1.0)
    table = torch.randperm(rows * cols + 1, device="cuda", generator=gen)[: rows * cols].view(rows, cols).int()
    if r:
        v.tag.zero_()
        v.score.uniform_(0, 1, generator=gen)
        v.k_hi.copy_(torch.randn(v.k_hi.shape, device="cuda", generator=gen).to(v.k_hi.dtype))
        v.v_hi.copy_(torch.randn(v.v_hi.shape, device="cuda", generator=gen).to(v.v_hi.dtype))
        budget = min(hi_budget(cfg, ctx, (ctx // n + 1) * r), (ctx // n) * r)
        for i in range(rows):
            for h in range(hkv):
                tags = torch.zeros((ctx // n + 1) * r, dtype=torch.int32, device="cuda")
                tags[:budget] = torch.randperm(ctx, device="cuda", generator=gen)[:budget].int() + 1
                v.tag[table[i, : ctx // n + 1].long(), h] = tags.view(-1, r)
    return regions, table


def _time(fn, iters: int) -> tuple[float, float]:
    """(eager us, CUDA-graph replay us) per call."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    eager = start.elapsed_time(end) * 1e3 / iters
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return eager, start.elapsed_time(end) * 1e3 / iters


def run(args) -> int:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_ops_count import shipped_presets
    from vllm.v1.attention.ops.triton_unified_attention import unified_attention

    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.kernels.ops import TritonOps
    from mikv_vllm.ops.plan import StepPlan, plan_for

    presets = shipped_presets()
    hq, hkv, d, n = args.q_heads, args.kv_heads, args.head_dim, args.block_size
    scale = d ** -0.5
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device {torch.cuda.get_device_name()}; {hq} q / {hkv} KV heads, head_dim {d}, block {n}, bf16; "
          f"times per layer call in us ({args.iters} iterations)")
    print("| preset | context | batch | MiKV eager | MiKV graph | vLLM paged eager | vLLM paged graph | MiKV / vLLM (graphs) |")
    print("|---|---|---|---|---|---|---|---|")
    compile_s = {}
    for name in args.presets:
        cfg = presets[name]
        layout = RegionLayout.build(cfg, n, d)
        for ctx in args.contexts:
            for bsz in args.batches:
                regions, table = _pages(cfg, layout, hkv, bsz, ctx, gen)
                q = torch.randn(bsz, hq, d, device="cuda", generator=gen).bfloat16()
                k = torch.randn(bsz, hkv, d, device="cuda", generator=gen).bfloat16()
                v = torch.randn(bsz, hkv, d, device="cuda", generator=gen).bfloat16()
                plan = plan_for(cfg, layout, table, [ctx] * bsz)
                TritonOps.prepare(StepPlan(decode=plan), layout, cfg, hq, hkv)
                if name not in compile_s:
                    t0 = time.time()
                    TritonOps.decode(regions, layout, cfg, plan, q, k, v, scale)
                    torch.cuda.synchronize()
                    compile_s[name] = time.time() - t0
                mikv = _time(lambda: TritonOps.decode(regions, layout, cfg, plan, q, k, v, scale), args.iters)
                kc = torch.randn(table.numel() + 1, n, hkv, d, device="cuda", generator=gen).bfloat16()
                vc = torch.randn_like(kc)
                out = torch.empty(bsz, hq, d, device="cuda", dtype=torch.bfloat16)
                cu_q = torch.arange(bsz + 1, device="cuda", dtype=torch.int32)
                used = torch.full((bsz,), ctx + 1, device="cuda", dtype=torch.int32)

                def paged():
                    unified_attention(q=q, k=kc, v=vc, out=out, cu_seqlens_q=cu_q, max_seqlen_q=1, seqused_k=used,
                                      max_seqlen_k=ctx + 1, softmax_scale=scale, causal=True, window_size=(-1, -1),
                                      block_table=table, softcap=0, q_descale=None, k_descale=None, v_descale=None)

                stock = _time(paged, args.iters)
                print(f"| {name} | {ctx} | {bsz} | {mikv[0]:.0f} | {mikv[1]:.0f} | {stock[0]:.0f} | {stock[1]:.0f} | "
                      f"{mikv[1] / stock[1]:.2f}x |", flush=True)
                del regions, kc, vc
    print("JIT compile (first decode step, s): " + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["mikv", "mikv-int3-r05", "h2o-r20"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 8192])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = ap.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        why = "dry run" if args.dry_run else "no CUDA device"
        print(f"plan ({why}): MiKV decode step vs vLLM unified_attention, presets {args.presets}, contexts "
              f"{args.contexts}, batches {args.batches}, {args.q_heads} q / {args.kv_heads} KV heads, head_dim "
              f"{args.head_dim}, block {args.block_size}: eager and CUDA-graph us per layer call, JIT compile s")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
