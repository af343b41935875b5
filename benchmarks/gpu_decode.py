"""MiKV Triton decode kernel vs fp16 attention (torch SDPA) on a CUDA device; no vllm import.

Usage: python benchmarks/gpu_decode.py [--out FILE] [--contexts 4096 16384 32768] [--batches 1 16 64]
       python benchmarks/gpu_decode.py --dry-run      # tiny CPU run under TRITON_INTERPRET=1, no timing

1. numerics on the device (small case): store bytes vs core.reference (bit-exact expected),
   decode_attention vs reference gather_context + attention for fp32/fp16/bf16 queries,
   two full forward_decode steps vs reference.forward_request (pages + outputs); the decode
   step's memory (persistent buffers; allocations of one layer call, expected 0);
2. a short launch-parameter sweep (BLOCK_N, num_warps) of the split kernel;
3. the timing table: per (preset, context, batch) the MiKV decode attention (hi map + split +
   merge + fused accumulation of the hi slots' scores; hi maintenance excluded and timed separately) vs SDPA
   over the same tokens in fp16; GB/s counts the bytes of every page region touched
   (blocks x KV heads x region bytes) resp. the fp16 K/V; L2 is flushed before every call.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mikv_vllm.config import MiKVConfig  # noqa: E402
from mikv_vllm.core import reference as ref  # noqa: E402
from mikv_vllm.core.importance import hi_budget  # noqa: E402
from mikv_vllm.core.layout import RegionLayout  # noqa: E402
from mikv_vllm.kernels import decode_attention, forward_decode, store_tokens  # noqa: E402

PRESETS = {
    "int2-r0.2": dict(policy="mikv", lo_bits=2, hi_ratio=0.2, balancer=True),
    "int3-r0.05": dict(policy="mikv", lo_bits=3, hi_ratio=0.05, balancer=True),
    "int3-r0.1": dict(policy="mikv", lo_bits=3, hi_ratio=0.1, balancer=True),   # the default preset
}
PEAK_GBPS = {"H200": 4800, "H100": 3350, "H800": 3350, "A100": 2039, "L40S": 864, "A10": 600}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- numerics
def _prefilled(config, dev, ctxs, hq, hkv, d, n=16, seed=0):
    """Pages prefilled through the reference; returns layout, regions, tables, next q/k/v."""
    gen = torch.Generator().manual_seed(seed)
    layout = RegionLayout.build(config, n, d)
    need = [-(-(c + 3) // n) for c in ctxs]
    regions = torch.randint(0, 256, (sum(need) + 1, hkv, layout.region_bytes), dtype=torch.uint8, generator=gen).to(dev)
    perm = torch.randperm(sum(need) + 1, generator=gen)
    tables, start = torch.zeros(len(ctxs), max(need), dtype=torch.int32), 0
    qs, ks, vs = [], [], []
    for i, c in enumerate(ctxs):
        tables[i, : need[i]] = perm[start: start + need[i]]
        start += need[i]
        chan = torch.ones(d)
        chan[: d // 16] = 8.0
        q = (torch.randn(c + 1, hq, d, generator=gen) * chan.sqrt()).to(dev)
        k = (torch.randn(c + 1, hkv, d, generator=gen) * chan).to(dev)
        v = torch.randn(c + 1, hkv, d, generator=gen).to(dev)
        if c:
            ref.forward_request(regions, layout, config, tables[i].to(dev), 0, q[:c], k[:c], v[:c], 0.1)
        qs.append(q[c]), ks.append(k[c]), vs.append(v[c])
    return layout, regions, tables.to(dev), torch.stack(qs), torch.stack(ks), torch.stack(vs)


def numerics(dev, dims) -> list[str]:
    """Markdown rows: max errors of the kernels vs the torch reference on ``dev``."""
    hq, hkv, d = dims
    rows = ["| preset | check | result |", "|---|---|---|"]
    for name, kw in PRESETS.items():
        cfg = MiKVConfig(name=name, **kw)
        ctxs = [45, 0, 16, 7]
        layout, regions, tables, q, k, v = _prefilled(cfg, dev, ctxs, hq, hkv, d)
        # store: bytes identical to reference.write_tokens
        blk = tables[:, 0].long()
        off = torch.tensor([3, 0, 7, 15], device=dev)
        a, b = regions.clone(), regions.clone()
        bal = torch.rand(4, hkv, d, device=dev).add_(0.5).half().float()
        for i in range(4):
            ref.write_tokens(a, layout, blk[i:i + 1], int(off[i]), k[i:i + 1] * 7, v[i:i + 1], bal[i])
        store_tokens(b, layout, blk, off, k * 7, v, bal)
        diff = int((a != b).sum())          # every byte: the store touches no score (they live in hi slots)
        rows.append(f"| {name} | store: differing page bytes (expect 0) | {diff} |")
        # decode attention for three query dtypes
        bals = torch.stack([ref.load_balancer(regions, layout, tables[i]) if c else torch.ones(hkv, d, device=dev)
                            for i, c in enumerate(ctxs)])
        # bf16 queries take the tf32 path (fp32 operands): the interpreter runs it in fp32
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        for dt in dtypes:
            qd = q.to(dt)
            exp_o, exp_m = [], []
            for i, c in enumerate(ctxs):
                kc, vc, ok = ref.gather_context(regions, layout, tables[i], c, bals[i])
                o, m = ref.attention(qd[i:i + 1].float(), kc, vc, ok, k[i:i + 1], v[i:i + 1], 0.1, 0)
                exp_o.append(o[0]), exp_m.append(m)
            out, mass = decode_attention(regions, layout, tables, torch.tensor(ctxs, device=dev), qd, k, v, 0.1, bals)
            oerr = (out - torch.stack(exp_o)).abs().max().item()
            merr = max((mass[i, :, : c + 1] - exp_m[i]).abs().max().item() for i, c in enumerate(ctxs))
            rows.append(f"| {name} | decode q {str(dt)[6:]}: max abs err out / mass | {oerr:.2e} / {merr:.2e} |")
        # full decode steps
        expected = regions.clone()
        worst, pages_ok, serr = 0.0, True, 0.0
        for step in range(2):
            c2 = [c + step for c in ctxs]
            want = torch.cat([ref.forward_request(expected, layout, cfg, tables[i], c, q[i:i + 1], k[i:i + 1],
                                                  v[i:i + 1], 0.1) for i, c in enumerate(c2)])
            got = forward_decode(regions, layout, cfg, tables, c2, q, k, v, 0.1)
            worst = max(worst, (got - want).abs().max().item())
            sa, sb = layout.views(expected).score.clone(), layout.views(regions).score.clone()
            layout.views(expected).score.zero_(), layout.views(regions).score.zero_()
            pages_ok &= torch.equal(expected, regions)
            layout.views(expected).score.copy_(sa), layout.views(regions).score.copy_(sb)
            live = layout.views(expected).tag > 0          # hi slots' scores (the others: bytes as they were)
            if live.any():
                rel = (sa[live] - sb[live]).abs() / sa[live].abs().clamp(min=1e-6)
                serr = max(serr, rel.max().item())
        rows.append(f"| {name} | forward_decode x2: max abs err / pages equal (excl. scores) / hi scores max rel err | "
                    f"{worst:.2e} / {pages_ok} / {serr:.2e} |")
    return rows


# ----------------------------------------------------------------------------- synthetic caches
def synthetic(config, dev, ctx, batch, hkv, d, n, seed=0):
    """A filled paged cache without running prefill: random codes, sane (scale, zero), hi set = r*L
    random positions per (request, head) in the request's slots, balancer 1, scores 0."""
    g = torch.Generator(device=dev).manual_seed(seed)
    layout = RegionLayout.build(config, n, d)
    nb = -(-(ctx + 1) // n)
    nblocks = batch * nb
    regions = torch.randint(0, 256, (nblocks, hkv, layout.region_bytes), dtype=torch.uint8, device=dev, generator=g)
    views = layout.views(regions)
    tables = torch.randperm(nblocks, device=dev, generator=g).view(batch, nb).to(torch.int32)
    if layout.bits:
        for sz in (views.k_sz, views.v_sz):
            sz[..., 0].uniform_(0.01, 0.1, generator=g)
            sz[..., 1].uniform_(-0.3, -0.1, generator=g)
    if layout.hi_slots:
        r = layout.hi_slots
        views.score.zero_()
        views.k_hi.normal_(generator=g), views.v_hi.normal_(generator=g)
        budget = hi_budget(config, ctx, nb * r)
        pos = torch.rand(batch, hkv, ctx, device=dev, generator=g).argsort(-1)[..., :budget].int() + 1
        tags = torch.zeros(batch, hkv, nb * r, dtype=torch.int32, device=dev)
        tags[..., :budget] = pos
        views.tag[tables.long()] = tags.view(batch, hkv, nb, r).permute(0, 2, 1, 3)
    if layout.has_balancer:
        views.balancer.fill_(1.0)
    return layout, regions, tables


def workspace_check(dev, dims, n) -> list[str]:
    """One long request among many short ones through the Triton decode step: the persistent
    buffers (made once by ``TritonOps.prepare``) and (CUDA) the memory a layer's call allocates."""
    from mikv_vllm.kernels.ops import TritonOps
    from mikv_vllm.ops.plan import StepPlan, plan_for

    hq, hkv, d = dims
    cfg = MiKVConfig(name="int3-r0.1", **PRESETS["int3-r0.1"])
    cuda = dev.type == "cuda"
    long_ctx, short, nshort = (32768, 1024, 64) if cuda else (300, 20, 8)
    ctxs = [long_ctx] + [short] * nshort
    layout, regions, tables = synthetic(cfg, dev, long_ctx, len(ctxs), hkv, d, n)
    q = torch.randn(len(ctxs), hq, d, device=dev, dtype=torch.bfloat16 if cuda else torch.float32)
    k, v = torch.randn(len(ctxs), hkv, d, device=dev), torch.randn(len(ctxs), hkv, d, device=dev)
    plan = plan_for(cfg, layout, tables, ctxs)
    TritonOps.prepare(StepPlan(decode=plan), layout, cfg, hq, hkv)
    buf = plan.kernel["triton_step"][0]
    held = sum(t.numel() * t.element_size() for t in vars(buf).values() if isinstance(t, torch.Tensor))
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    out = TritonOps.decode(regions, layout, cfg, plan, q, k, v, 1.0 / math.sqrt(d))
    per_call = "n/a (CPU: tests/kernels/test_workspace.py measures 0 bytes)"
    ok = bool(torch.isfinite(out).all())
    if cuda:
        torch.cuda.synchronize()
        used = torch.cuda.max_memory_allocated() - base
        per_call = f"{used} bytes"
        ok = ok and used == 0
    return ["| check | value |", "|---|---|",
            f"| batch | 1 x {long_ctx} + {nshort} x {short} tokens |",
            f"| persistent decode buffers (rows x block-table width) | {held / 2**20:.1f} MiB |",
            f"| allocated by one layer call | {per_call} |",
            f"| nothing allocated per call, outputs finite | {ok} |"]


def bench(fn, flush, iters, dev) -> float:
    """Median ms of ``fn`` with L2 flushed before each call."""
    for _ in range(2):
        fn()
    if dev.type != "cuda":
        return float("nan")
    times = []
    for _ in range(iters):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def sdpa_fn(q, k, v):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                return sdpa(q, k, v)
        run()
        return run
    except Exception:
        return lambda: sdpa(q, k, v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1, no timing")
    ap.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--peak-gbps", type=float, default=None, help="device bandwidth (default: by device name)")
    ap.add_argument("--no-tune", action="store_true", help="skip the BLOCK_N / num_warps sweep")
    ap.add_argument("--skip-numerics", action="store_true")
    ap.add_argument("--out", default=None, help="also write the Markdown report here")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.dry_run:
        dev = torch.device("cpu")
        args.contexts, args.batches, args.q_heads, args.kv_heads, args.head_dim = [40], [2], 4, 2, 64
        args.iters = 1
        name, peak = "cpu (TRITON_INTERPRET=1, no timing)", None
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --dry-run", file=sys.stderr)
            return 2
        dev = torch.device("cuda")
        name = torch.cuda.get_device_name(dev)
        peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    import triton

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    hq, hkv, d, n = args.q_heads, args.kv_heads, args.head_dim, args.block_size
    lines = ["# MiKV decode benchmark", "",
             f"device: {name}; torch {torch.__version__}, triton {triton.__version__}; peak {peak or '?'} GB/s; "
             f"{hq} q heads / {hkv} kv heads, head_dim {d}, block {n}", ""]

    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")

    def emit(text=""):  # stdout + --out file, line by line (a killed run keeps what it measured)
        lines.append(text)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")

    for text in lines:
        print(text, flush=True)
    if not args.skip_numerics:
        try:
            dims = (hq, hkv, d) if not args.dry_run else (4, 2, 64)
            emit("## Numerics vs torch reference (on this device)")
            emit()
            for row in numerics(dev, dims):
                emit(row)
        except Exception:
            emit(f"numerics FAILED:\n```\n{traceback.format_exc()}```")
        emit()
        log(f"numerics done at {time.time() - t0:.0f}s")

    if not args.skip_numerics:
        try:
            emit("## Decode step memory (persistent buffers, per-call allocations)")
            emit()
            for row in workspace_check(dev, (hq, hkv, d) if not args.dry_run else (4, 2, 64), n):
                emit(row)
        except Exception:
            emit(f"workspace check FAILED:\n```\n{traceback.format_exc()}```")
        emit()
        log(f"workspace check done at {time.time() - t0:.0f}s")

    flush = torch.empty(256 << 20 if dev.type == "cuda" else 1, dtype=torch.uint8, device=dev)
    scale = 1.0 / math.sqrt(d)
    best = dict(block_n=None, num_warps=None)
    if not args.no_tune:
        try:
            sctx, sbsz = (16384, 16) if dev.type == "cuda" else (40, 2)
            grid = [(16, 2), (16, 4), (32, 2), (32, 4), (32, 8), (64, 4), (64, 8)] if dev.type == "cuda" else [(16, 2)]
            cfg = MiKVConfig(name=args.presets[0], **PRESETS[args.presets[0]])
            layout, regions, tables = synthetic(cfg, dev, sctx, sbsz, hkv, d, n)
            q = torch.randn(sbsz, hq, d, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
            k, v = torch.randn(sbsz, hkv, d, device=dev), torch.randn(sbsz, hkv, d, device=dev)
            ctx = torch.full((sbsz,), sctx, device=dev, dtype=torch.int32)
            emit(f"## Split-kernel sweep ({args.presets[0]}, ctx {sctx}, batch {sbsz}; ms)")
            emit()
            emit("| BLOCK_N | num_warps | ms |")
            emit("|---|---|---|")
            res = {}
            nm = torch.empty(sbsz, hkv, device=dev)
            for bn, nw in grid:
                try:
                    res[(bn, nw)] = bench(lambda: decode_attention(
                        regions, layout, tables, ctx, q, k, v, scale, None, max_ctx=sctx, need_mass=False,
                        accumulate=True, new_mass=nm, block_n=bn, num_warps=nw), flush, 5, dev)
                    emit(f"| {bn} | {nw} | {res[(bn, nw)]:.3f} |")
                except Exception as exc:  # noqa: BLE001
                    emit(f"| {bn} | {nw} | FAILED: {type(exc).__name__} |")
                    log(traceback.format_exc())
            res = {key: t for key, t in res.items() if t == t}
            if res:
                best["block_n"], best["num_warps"] = min(res, key=res.get)
            emit(f"\nchosen: BLOCK_N {best['block_n'] or 'default'}, num_warps {best['num_warps'] or 'default'}\n")
            del regions
        except Exception:
            emit(f"sweep FAILED:\n```\n{traceback.format_exc()}```")
        log(f"sweep done at {time.time() - t0:.0f}s")

    emit("## Decode attention: MiKV (Triton, paged) vs fp16 SDPA (dense, same tokens)")
    emit()
    emit("| preset | ctx | batch | fp16 ms | MiKV ms | MiKV/fp16 | page bytes / fp16 bytes | MiKV GB/s | % peak "
         "| fp16 GB/s | hi maint ms (torch) |")
    emit("|---|---|---|---|---|---|---|---|---|---|---|")
    for pname in args.presets:
        cfg = MiKVConfig(name=pname, **PRESETS[pname])
        for ctx in args.contexts:
            for bsz in args.batches:
                try:
                    layout, regions, tables = synthetic(cfg, dev, ctx, bsz, hkv, d, n)
                    qdt = torch.float16 if dev.type == "cuda" else torch.float32
                    q = torch.randn(bsz, hq, d, device=dev, dtype=qdt)
                    k, v = torch.randn(bsz, hkv, d, device=dev), torch.randn(bsz, hkv, d, device=dev)
                    ctx_t = torch.full((bsz,), ctx, device=dev, dtype=torch.int32)
                    bal = torch.ones(bsz, hkv, d, device=dev)
                    nm = torch.empty(bsz, hkv, device=dev)
                    mikv = bench(lambda: decode_attention(regions, layout, tables, ctx_t, q, k, v, scale, bal,
                                                          max_ctx=ctx, need_mass=False, accumulate=True,
                                                          new_mass=nm, **best),
                                 flush, args.iters, dev)
                    maint = float("nan")
                    if layout.hi_slots:
                        sync()
                        t = time.perf_counter()
                        step_mass = torch.zeros(hkv, ctx + 1, device=dev)   # the new token's (column ctx)
                        for i in range(bsz):
                            ref.maintain_hi(regions, layout, cfg, tables[i], ctx, k[i:i + 1], v[i:i + 1], step_mass)
                        sync()
                        maint = (time.perf_counter() - t) * 1e3 if dev.type == "cuda" else float("nan")
                    page_bytes = tables.numel() * hkv * layout.region_bytes
                    del regions
                    kf = torch.randn(bsz, hkv, ctx + 1, d, device=dev, dtype=torch.float16)
                    vf = torch.randn_like(kf)
                    qf = torch.randn(bsz, hkv, hq // hkv, d, device=dev, dtype=torch.float16)
                    dense = bench(sdpa_fn(qf, kf, vf), flush, args.iters, dev)
                    del kf, vf
                    fp16_bytes = 2 * bsz * hkv * (ctx + 1) * d * 2
                    gbs = page_bytes / mikv / 1e6
                    emit(f"| {pname} | {ctx} | {bsz} | {dense:.3f} | {mikv:.3f} | {mikv / dense:.2f} | "
                         f"{page_bytes / fp16_bytes:.2f} | {gbs:.0f} | "
                         f"{(100 * gbs / peak) if peak else float('nan'):.0f} | {fp16_bytes / dense / 1e6:.0f} | "
                         f"{maint:.1f} |")
                except Exception as exc:  # noqa: BLE001
                    emit(f"| {pname} | {ctx} | {bsz} | FAILED: {type(exc).__name__}: {str(exc)[:120]} |")
                    log(traceback.format_exc())
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                log(f"{pname} ctx {ctx} batch {bsz} done at {time.time() - t0:.0f}s")
    emit()
    emit(f"MiKV ms = hi-slot map (torch scatter) + split kernel + LSE merge + fused hi-slot score accumulation, "
         f"q fp16; GB/s = touched page bytes / time; total runtime {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
