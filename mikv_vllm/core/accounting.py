"""Bytes per token per KV head of the MiKV page, per preset, with both accountings.

* in-page: what vLLM really allocates (``RegionLayout.content_bytes``), split into
  the lo copies of every token, the hi slots, and bookkeeping (score, tags,
  balancer header, alignment padding);
* paper: ``layout.paper_cache_fraction`` - ``r*bpe(hi) + (1-r)*bpe(lo)``, which
  does not count the lo copy we keep for hi tokens nor any bookkeeping;
* paper + lo copy: ``r*bpe(hi) + bpe(lo)`` - the paper's formula for a layout
  where every token has a lo copy (mikv-paper.md §11), still without bookkeeping.
"""

from __future__ import annotations

from ..config import PRESETS, MiKVConfig, preset
from .layout import HI_BITS, RegionLayout, dense_bytes_per_token, paper_cache_fraction

HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 128)


def paper_fraction_with_lo_copy(config: MiKVConfig, head_dim: int) -> float:
    """``(r*bpe(hi) + bpe(lo)) / 16``: paper accounting plus the lo copy of hi tokens."""
    g = config.group_for(head_dim)
    lo = config.lo_bits + 32 / g if config.lo_bits else 0.0
    return (config.hi_ratio * HI_BITS[config.hi_dtype] + lo) / 16


def bytes_row(config: MiKVConfig, head_dim: int, block_size: int) -> dict:
    """One table row for ``config`` at (head_dim, block_size)."""
    lay = RegionLayout.build(config, block_size, head_dim)
    br = lay.breakdown()
    dense = dense_bytes_per_token(head_dim)
    return {
        "preset": config.name,
        "head_dim": head_dim,
        "block_size": block_size,
        "hi_slots": lay.hi_slots,
        "bytes_per_token": br["total"],
        "lo_kv": br["lo_kv"],
        "hi_kv": br["hi_kv"],
        "bookkeeping": br["score"] + br["tag"] + br["balancer"] + br["padding"],
        "dense_fp16": dense,
        "in_page_fraction": br["total"] / dense,
        "paper_fraction": paper_cache_fraction(config, head_dim),
        "paper_with_lo_copy": paper_fraction_with_lo_copy(config, head_dim),
    }


def bytes_table(presets=None, head_dims=HEAD_DIMS, block_sizes=BLOCK_SIZES) -> list[dict]:
    """Rows for every preset (default: all of ``config.PRESETS``) x head_dim x block_size."""
    names = list(PRESETS) if presets is None else list(presets)
    return [bytes_row(preset(name), d, n) for name in names for d in head_dims for n in block_sizes]


def to_markdown(rows: list[dict]) -> str:
    """Render rows as a Markdown table (bytes per token per KV head)."""
    head = ("| preset | head_dim | block | R | B/token in page | lo K+V | hi K+V | bookkeeping "
            "| in-page % of fp16 | paper % | paper + lo copy % |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['head_dim']} | {r['block_size']} | {r['hi_slots']} "
            f"| {r['bytes_per_token']:.0f} | {r['lo_kv']:.2f} | {r['hi_kv']:.2f} | {r['bookkeeping']:.2f} "
            f"| {100 * r['in_page_fraction']:.2f} | {100 * r['paper_fraction']:.2f} "
            f"| {100 * r['paper_with_lo_copy']:.2f} |")
    return "\n".join(lines)
