"""Print the MiKV bytes-per-token table (all presets) as Markdown.

Usage: python benchmarks/bytes_table.py [--head-dims 64 128] [--block-sizes 16 128] [--presets NAME ...]
"""

from __future__ import annotations

import argparse

from mikv_vllm.core.accounting import BLOCK_SIZES, HEAD_DIMS, bytes_table, to_markdown


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--block-sizes", type=int, nargs="+", default=list(BLOCK_SIZES))
    ap.add_argument("--presets", nargs="+", default=None, help="preset names (default: all)")
    args = ap.parse_args(argv)
    rows = bytes_table(args.presets, args.head_dims, args.block_sizes)
    print("Bytes per token per KV head. In-page = what vLLM allocates (lo copy of every token, hi slots,")
    print("score/tag/balancer/padding). Paper % = r*bpe(hi) + (1-r)*bpe(lo) (no lo copy of hi tokens,")
    print("no bookkeeping); paper + lo copy % = r*bpe(hi) + bpe(lo). fp16 dense = 4*head_dim bytes.\n")
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
