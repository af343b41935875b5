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
from .layout import HI_BITS, RegionLayout, dense_bytes_per_token, lo_bits_per_element, paper_cache_fraction

HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 128)


def paper_fraction_with_lo_copy(config: MiKVConfig, head_dim: int) -> float:
    """``(r*bpe(hi) + bpe(lo)) / 16``: paper accounting plus the lo copy of hi tokens."""
    return (config.hi_ratio * HI_BITS[config.hi_dtype] + lo_bits_per_element(config, head_dim)) / 16


def bytes_row(config: MiKVConfig, head_dim: int, block_size: int) -> dict:
    """One table row for ``config`` at (head_dim, block_size)."""
    lay = RegionLayout.build(config, block_size, head_dim)
    br = lay.breakdown()
    dense = dense_bytes_per_token(head_dim)
    return {
        "preset": config.name,
        "k_bits": config.k_bits,
        "v_bits": config.v_bits,
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
    """Rows for every config x head_dim x block_size; ``presets`` holds preset names or
    :class:`MiKVConfig` objects (default: all of ``config.PRESETS``)."""
    names = list(PRESETS) if presets is None else list(presets)
    configs = [c if isinstance(c, MiKVConfig) else preset(c) for c in names]
    return [bytes_row(c, d, n) for c in configs for d in head_dims for n in block_sizes]


def bits_label(row: dict) -> str:
    """``4`` when keys and values share a width, else ``K4/V3``."""
    k, v = row["k_bits"], row["v_bits"]
    return f"{k}" if k == v else f"K{k}/V{v}"


def to_markdown(rows: list[dict]) -> str:
    """Render rows as a Markdown table (bytes per token per KV head)."""
    head = ("| preset | lo bits | head_dim | block | R | B/token in page | lo K+V | hi K+V | bookkeeping "
            "| in-page % of fp16 | paper % | paper + lo copy % |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {bits_label(r)} | {r['head_dim']} | {r['block_size']} | {r['hi_slots']} "
            f"| {r['bytes_per_token']:.0f} | {r['lo_kv']:.2f} | {r['hi_kv']:.2f} | {r['bookkeeping']:.2f} "
            f"| {100 * r['in_page_fraction']:.2f} | {100 * r['paper_fraction']:.2f} "
            f"| {100 * r['paper_with_lo_copy']:.2f} |")
    return "\n".join(lines)
