"""Torch ops + Triton launches of one attention layer's decode step, per shipped preset (configs/).

Runs the backend's real layer forward (``MiKVAttentionImpl.forward``) on the Triton op set over a
decode batch whose metadata the backend's builder made outside the layer (as vLLM does once per
step), under :class:`mikv_vllm.kernels.probe.LayerProbe`: every aten op (views counted apart:
they launch nothing) and every Triton launch inside the forward, and any host sync,
data-dependent shape or host-to-device copy. On CPU the kernels run under ``TRITON_INTERPRET=1``
(set here when no GPU is present); counts do not depend on the device.

    python benchmarks/gpu_ops_count.py [--rows 4] [--ctx 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 64, 16


def shipped_presets() -> dict:
    """configs/<name>.yaml -> MiKVConfig: the file's preset with its ``mikv-*`` fields on top."""
    import yaml

    from mikv_vllm.config import preset

    out = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        fields = {k[len("mikv-"):].replace("-", "_"): v for k, v in data.items()
                  if k.startswith("mikv-") and k != "mikv-config"}
        out[path.stem] = preset(data["mikv-config"]).replace(**fields)
    return out


def make_layer(config, device: str = "cpu"):
    """A ``MiKVAttentionImpl`` and ``MiKVMetadataBuilder`` without an engine (what their __init__
    would set from vLLM's config)."""
    from mikv_vllm.core.rotation import rotation_for
    from mikv_vllm.vllm_glue.backend import MiKVAttentionImpl, MiKVMetadataBuilder
    from mikv_vllm.vllm_glue.stats import LayerStats

    impl = object.__new__(MiKVAttentionImpl)
    impl.config, impl.num_heads, impl.num_kv_heads, impl.head_size = config, HEADS, KV_HEADS, HEAD_DIM
    impl.scale, impl.kv_cache_dtype, impl.layout = HEAD_DIM ** -0.5, "auto", None
    impl.rotation = rotation_for(HEAD_DIM) if config.rotation else None
    impl.stats = LayerStats()
    impl.stats.sampled = False                  # a layer /mikv/stats does not sample (all but the first)
    builder = object.__new__(MiKVMetadataBuilder)
    builder.prefix_caching = False
    return impl, builder


def decode_metadata(builder, ctxs: list[int], table: torch.Tensor, padded: int = 0, admitted=None):
    """The step's metadata for one-token rows at contexts ``ctxs`` (+ ``padded`` rows at seq_len 0);
    ``admitted``: each real row's prefix-cache hit in tokens (prefix caching; None: off)."""
    from mikv_vllm.vllm_glue import sharing

    seq = torch.tensor([c + 1 for c in ctxs] + [0] * padded, dtype=torch.int32)
    n = seq.shape[0]
    qsl = torch.tensor([0] + [min(i + 1, len(ctxs)) for i in range(n)], dtype=torch.int32)
    m = SimpleNamespace(num_reqs=n, query_start_loc=qsl.to(table.device), query_start_loc_cpu=qsl,
                        seq_lens=seq.to(table.device),
                        seq_lens_cpu_upper_bound=seq.clone(), block_table_tensor=table, max_query_len=1,
                        slot_mapping=torch.zeros(n, dtype=torch.int64), num_actual_tokens=n, max_seq_len=int(seq.max()))
    builder.prefix_caching = admitted is not None
    sharing._state.rows = admitted             # what vllm_glue.sharing records for the step's real rows
    try:
        return builder.build(0, m)
    finally:
        sharing._state.rows = None


def run_layer(config, rows: int = 4, ctx: int = 40, probe=None, seed: int = 0, padded: int = 0,
              hook=None, dtype: torch.dtype = torch.bfloat16, shared: int = 0) -> dict:
    """Build a layer and pages, run one warm-up decode step and one probed step; return the probe's
    summary. ``hook(impl, meta)`` may change things between the builds and the probed forward.
    ``shared`` (blocks): prefix caching on, each later row whose context covers them reads the first
    row's first ``shared`` blocks."""
    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.kernels.probe import LayerProbe

    impl, builder = make_layer(config)
    cols = -(-(ctx + 4) // BLOCK)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    builder.init_plans(config, BLOCK, HEAD_DIM, HEADS, KV_HEADS, max_rows=rows + padded, max_cols=cols, device=dev)
    layout = RegionLayout.build(config, BLOCK, HEAD_DIM)
    gen = torch.Generator().manual_seed(seed)
    nb = (rows + padded) * cols + 1
    cache = torch.randint(0, 256, (nb, KV_HEADS, BLOCK, layout.region_bytes // BLOCK), dtype=torch.uint8,
                          generator=gen).to(dev)
    table = torch.randperm(nb, generator=gen)[: (rows + padded) * cols].reshape(rows + padded, cols).int().to(dev)
    ctxs = [max(0, ctx - 3 * i) for i in range(rows)]
    admitted = [shared * BLOCK if i and c >= shared * BLOCK else 0 for i, c in enumerate(ctxs)] if shared else None
    for i, a in enumerate(admitted or []):
        if a:
            table[i, :shared] = table[0, :shared]
    t = rows + padded
    qkv = [torch.randn(t, h * HEAD_DIM, generator=gen).to(dev, dtype) for h in (HEADS, KV_HEADS, KV_HEADS)]
    out = torch.empty(t, HEADS * HEAD_DIM, dtype=dtype, device=dev)
    impl.forward(None, *qkv, cache, decode_metadata(builder, ctxs, table, padded, admitted), out)   # warm-up
    meta = decode_metadata(builder, [c + 1 for c in ctxs], table, padded, admitted)    # built outside the layer
    if shared and not (meta.decode.shared and int(meta.decode.own_from.max()) == shared):
        raise RuntimeError(f"no row reads {shared} shared blocks at contexts {ctxs}")
    if hook is not None:
        hook(impl, meta)
    probe = probe or LayerProbe(strict=False)
    with probe:
        impl.forward(None, *qkv, cache, meta, out)
    return probe.summary()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=40)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="the model's activations (q / k / v / output)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    # here, not at import: tests import this module, and a module-level default would leak into
    # every engine the test session starts later
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels are imported
    os.environ.setdefault("MIKV_VLLM_OPS", "triton")
    dtype = getattr(torch, args.dtype)
    results = {name: run_layer(cfg, args.rows, args.ctx, dtype=dtype) for name, cfg in shipped_presets().items()}
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"one decode step of one layer, {args.rows} rows at context <= {args.ctx + 1}, "
          f"{HEADS} q / {KV_HEADS} KV heads, head_dim {HEAD_DIM}, block {BLOCK}, {args.dtype}, Triton op set")
    print("| preset | torch ops | Triton launches | ops + launches | views | syncs / data shapes / H2D |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['torch_ops']} | {r['launches']} | {r['total']} | {r['views']} | "
              f"{len(r['violations'])} |")
    for name, r in results.items():
        print(f"{name}: ops {r['ops']}; kernels {r['kernels']}" + (f"; VIOLATIONS {r['violations']}" if r['violations'] else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
