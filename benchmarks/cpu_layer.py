"""One decode step of one attention layer on CPU: stock vLLM CPU attention vs MiKV, side by side.

Per (context, batch): B requests of ``context`` cached tokens each, fp32, the embedded model's
shape (9 query / 3 KV heads, head_dim 64, block 128). Timed per step (median of ``--steps``):

* stock   vLLM's own CPU ops: ``cpu_attn_reshape_and_cache`` + ``cpu_attention_with_kv_cache``
          (scheduler metadata built once per step outside the timing, as vLLM's builder does)
* fused   MiKV C++ step without the hi-set upkeep (``mikv_vllm.cpu.decode_step``: balancer, store,
          attention, scores)
* fast    the whole MiKV layer step: the C++ step with its incremental hi-set upkeep
          (``decode_step(..., config)``, what ``CpuOps.forward_decode`` runs)
* ref     the batched torch op set ``ops.torch_decode.forward_decode``

Prints ms per layer-step, stock/MiKV ratios (>1 means MiKV is faster) and the GB/s of cache read
on each side: bytes the step reads from the cache / median time (stock: the fp32 K and V of every
context token; MiKV: the K and V lo codes and (scale, zero) of every context token, the hi copies
of its tagged tokens, the tags and scores of its blocks; decode: the ``fast`` step). Not a test.
``--layers L`` (default 30, the embedded model's): each side keeps L caches of the same shape and
step s reads cache s mod L, as the engine's L layers do one after the other; with ``--layers 1``
every step rereads one cache that then sits in the CPU's caches (stock's fp32 K/V of small
batches fits in L2/L3 and streams at 30-60 GB/s there, which no engine step sees).
``MIKV_CPU_QK=int8`` times the int8 QK path instead of the default exact one. On a
shared machine use ``--threads 1``: OpenMP regions of both sides stall when other processes hold
the cores, and the medians stop meaning anything.

``--prefill CTX:T ...``: one prefill chunk of T tokens at context CTX for each of B requests
instead (stock: reshape_and_cache + causal attention of the chunk; fused: the C++ prefill step
``CpuOps.chunks`` on a step plan made once outside the timing, as the engine's metadata builder makes
it once per step for every layer; all chunks in one call, hi upkeep included; ref: the torch reference
``forward_request`` per request, the CPU path before the fused prefill).

    python benchmarks/cpu_layer.py [--preset mikv] [--context 512 2048] [--batch 1 8 32] [--steps 30] [--threads 1]
                                   [--layers 30]
    python benchmarks/cpu_layer.py --prefill 0:512 1536:512 0:2048 --batch 1 4 --steps 5
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from mikv_vllm.config import MiKVConfig
from mikv_vllm.core import reference as ref
from mikv_vllm.ops import torch_decode as tdec
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.cpu import CpuOps, decode_step
from mikv_vllm.ops.plan import plan_for

N, D, H, HQ = 128, 64, 3, 9
SCALE = D ** -0.5


def cpu_model() -> str:
    """The CPU's model name (as ``lscpu``'s "Model name")."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interleaved_ms(fns: dict, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median ms per call of each fn(step), the fns run round-robin (shared-machine noise hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for s in range(warmup + steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(s)
            if s >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def stock_step_fn(context: int, batch: int, steps: int, layers: int = 1):
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    per_req = (context + steps + 8) // N + 1
    nblocks = batch * per_req
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(nblocks, H, N, 2 * D, generator=gen).view(nblocks, H, N * 2, D).chunk(2, dim=2)
              for _ in range(layers)]   # (key_cache, value_cache) per layer
    table = torch.arange(nblocks, dtype=torch.int32).reshape(batch, per_req)
    isa = _get_attn_isa(torch.float32, N, D, "auto")
    q = torch.randn(batch, HQ, D, generator=gen)
    k, v = torch.randn(batch, H, D, generator=gen), torch.randn(batch, H, D, generator=gen)
    out = torch.empty(batch, HQ, D)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    metas = {}

    def step(s: int) -> None:
        pos = context + s
        if s not in metas:   # per step, shared by all layers: outside the per-layer timing
            seq = torch.full((batch,), pos + 1, dtype=torch.int32)
            slots = (table[:, pos // N].long() * N + pos % N)
            sched = ops.cpu_attn_get_scheduler_metadata(batch, HQ, H, D, seq, torch.float32, qsl, True, -1, isa,
                                                        True)
            metas[s] = (seq, slots, sched)
        seq, slots, sched = metas[s]
        key_cache, value_cache = caches[s % layers]
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        ops.cpu_attention_with_kv_cache(q, key_cache, value_cache, out, qsl, seq, SCALE, True, None, -1, table,
                                        0.0, sched, None)

    for s in range(steps + 2):   # build the metadata up front
        step(s)
    return step


def stock_prefill_fn(context: int, chunk: int, batch: int):
    """Stock vLLM CPU ops for one chunk of ``chunk`` tokens at ``context`` for each of B requests."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    per_req = (context + chunk) // N + 1
    nblocks = batch * per_req
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(nblocks, H, N, 2 * D, generator=gen)
    kv = cache.view(nblocks, H, N * 2, D)
    key_cache, value_cache = kv.chunk(2, dim=2)
    table = torch.arange(nblocks, dtype=torch.int32).reshape(batch, per_req)
    isa = _get_attn_isa(torch.float32, N, D, "auto")
    q = torch.randn(batch * chunk, HQ, D, generator=gen)
    k, v = torch.randn(batch * chunk, H, D, generator=gen), torch.randn(batch * chunk, H, D, generator=gen)
    out = torch.empty(batch * chunk, HQ, D)
    qsl = torch.arange(batch + 1, dtype=torch.int32) * chunk
    seq = torch.full((batch,), context + chunk, dtype=torch.int32)
    pos = torch.arange(context, context + chunk)
    slots = (table[:, pos // N].long() * N + pos % N).reshape(-1)
    sched = ops.cpu_attn_get_scheduler_metadata(batch, HQ, H, D, seq, torch.float32, qsl, True, -1, isa, False)

    def step(s: int) -> None:
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        ops.cpu_attention_with_kv_cache(q, key_cache, value_cache, out, qsl, seq, SCALE, True, None, -1, table,
                                        0.0, sched, None)

    return step


def run_prefill(config: MiKVConfig, context: int, chunk: int, batch: int, steps: int,
                with_ref: bool = True) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch * chunk, h, D, generator=gen) for h in (HQ, H, H))
    fns = {"stock": stock_prefill_fn(context, chunk, batch)}
    layout, base, table = mikv_state(config, context, batch, chunk)
    ctx = torch.full((batch,), context, dtype=torch.int64)
    rows = torch.stack([torch.arange(batch) * chunk, torch.arange(1, batch + 1) * chunk], dim=1)
    plan = plan_for(config, layout, table, ctx, None, rows)   # once per step in the engine, for every layer
    for name in ("fused", "ref") if with_ref else ("fused",):
        regions = base.clone()   # the same chunk rewritten every step: same work each time

        def step(s, regions=regions, name=name):
            if name == "fused":
                CpuOps.chunks(regions, layout, config, plan, q, k, v, SCALE)
                return
            for b in range(batch):
                sl = slice(b * chunk, (b + 1) * chunk)
                ref.forward_request(regions, layout, config, table[b], context, q[sl], k[sl], v[sl], SCALE)

        fns[name] = step
    r = _interleaved_ms(fns, steps, warmup=1)
    r["stock_bytes"] = stock_bytes(context + chunk, batch)   # the chunk's keys are cached first, then read
    r["mikv_bytes"] = mikv_bytes(layout, base, table, context)   # the chunk's own keys are read raw
    return r


def mikv_state(config: MiKVConfig, context: int, batch: int, steps: int):
    """Pages of B requests holding a prefilled context (one prefill, copied to every request)."""
    layout = RegionLayout.build(config, N, D)
    per_req = (context + steps + 8) // N + 1
    regions = torch.zeros(batch * per_req, H, layout.region_bytes, dtype=torch.uint8)
    table = torch.arange(batch * per_req, dtype=torch.int32).reshape(batch, per_req)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(context, h, D, generator=gen) for h in (HQ, H, H))
    if context:
        ref.forward_request(regions, layout, config, table[0], 0, q, k, v, SCALE)
    for i in range(1, batch):
        regions[table[i]] = regions[table[0]]
    # tags hold positions, not blocks: copies stay valid for every request
    return layout, regions, table


def stock_bytes(context: int, batch: int) -> int:
    """Cache bytes stock's decode step reads: fp32 K and V of ``context`` tokens per request and KV head."""
    return batch * H * context * 2 * D * 4


def mikv_bytes(layout: RegionLayout, regions: torch.Tensor, table: torch.Tensor, context: int) -> int:
    """Cache bytes MiKV's decode step reads at ``context``: per request and KV head, the lo codes and
    (scale, zero) pairs of K and V of every context token, the hi copies (K and V) of its tagged
    tokens, and the tags and scores of its blocks."""
    hi_es = torch.empty((), dtype=layout.hi_dtype).element_size()
    per_token = layout.k_packed_bytes + layout.v_packed_bytes + 2 * layout.groups * 4
    nb = -(-context // N)
    total = 0
    for row in table:
        tags = layout.views(regions[row[:nb].long()]).tag if layout.hi_slots else None
        hi = int(((tags > 0) & (tags <= context)).sum()) if tags is not None else 0
        total += H * (context * per_token + nb * layout.hi_slots * 8) + hi * 2 * D * hi_es
    return total


def run(config: MiKVConfig, context: int, batch: int, steps: int, with_ref: bool = True,
        layers: int = 1) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, h, D, generator=gen) for h in (HQ, H, H))
    fns = {"stock": stock_step_fn(context, batch, steps, layers)}
    layout, base, table = mikv_state(config, context, batch, steps)
    for name in ("fused", "fast", "ref") if with_ref else ("fused", "fast"):
        per_layer = [base.clone() for _ in range(layers)]

        def step(s, per_layer=per_layer, name=name):
            regions = per_layer[s % layers]
            pos = torch.full((batch,), context + s // layers, dtype=torch.int64)
            if name == "ref":
                tdec.forward_decode(regions, layout, config, table, pos.tolist(), q, k, v, SCALE)
                return
            decode_step(regions, layout, table, pos, q, k, v, SCALE, config if name == "fast" else None)

        fns[name] = step
    r = _interleaved_ms(fns, steps)
    r["stock_bytes"] = stock_bytes(context, batch)
    r["mikv_bytes"] = mikv_bytes(layout, base, table, context)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mikv")
    p.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-ref", action="store_true", help="skip the torch reference (slow at large batches)")
    p.add_argument("--layers", type=int, default=30,
                   help="decode: caches per side, read round-robin as an engine's layers (1: one cache-hot layer)")
    p.add_argument("--prefill", nargs="+", default=None, metavar="CTX:T",
                   help="time prefill chunks of T tokens at context CTX instead of decode steps")
    args = p.parse_args(argv)
    config = MiKVConfig.parse(args.preset)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; MIKV_CPU_QK={os.environ.get('MIKV_CPU_QK') or 'unset (default fp32)'}")
    print(f"preset {args.preset}, fp32, {HQ} q / {H} kv heads, head_dim {D}, block {N}, torch threads "
          f"{torch.get_num_threads()}; ms per layer-step (median of {args.steps}); ratio = stock ms / MiKV ms")
    if not args.prefill:
        print(f"decode: {args.layers} layer cache(s) per side, read round-robin\n")
    if args.prefill:
        print("| context | chunk | requests | stock | MiKV fused (C++ prefill) | reference | stock/fused | stock/ref | "
              "ref/fused | stock MB, GB/s | MiKV MB, GB/s |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for spec in args.prefill:
            c, t = (int(x) for x in spec.split(":"))
            for b in args.batch:
                r = run_prefill(config, c, t, b, args.steps, with_ref=not args.no_ref)
                refs = f"{r['ref']:.1f}" if "ref" in r else "-"
                ratios = (f"{r['stock'] / r['ref']:.2f}x | {r['ref'] / r['fused']:.2f}x" if "ref" in r else "- | -")
                sb, mb = r["stock_bytes"], r["mikv_bytes"]
                print(f"| {c} | {t} | {b} | {r['stock']:.2f} | {r['fused']:.2f} | {refs} | "
                      f"{r['stock'] / r['fused']:.2f}x | {ratios} | {sb / 1e6:.1f}, {sb / r['stock'] / 1e6:.1f} | "
                      f"{mb / 1e6:.1f}, {mb / r['fused'] / 1e6:.1f} |", flush=True)
        return 0
    print("| context | batch | stock | MiKV fused | MiKV fast (+hi upkeep) | reference | stock/fused | "
          "stock/fast | stock/ref | stock MB, GB/s | MiKV MB, GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in args.context:
        for b in args.batch:
            r = run(config, c, b, args.steps, with_ref=not args.no_ref, layers=args.layers)
            refs = f"{r['ref']:.2f}" if "ref" in r else "-"
            ref_ratio = f"{r['stock'] / r['ref']:.2f}x" if "ref" in r else "-"
            sb, mb = r["stock_bytes"], r["mikv_bytes"]
            print(f"| {c} | {b} | {r['stock']:.3f} | {r['fused']:.3f} | {r['fast']:.3f} | {refs} | "
                  f"{r['stock'] / r['fused']:.2f}x | {r['stock'] / r['fast']:.2f}x | {ref_ratio} | "
                  f"{sb / 1e6:.1f}, {sb / r['stock'] / 1e6:.1f} | {mb / 1e6:.1f}, {mb / r['fast'] / 1e6:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
