"""The quality-vs-bytes figure: one line per policy family (its envelope), one panel per quality measure."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from .rule import PPL_RATIO_MAX


FAMILY_STYLE = {
    "mikv INT2": ("tab:blue", "o"), "mikv INT3": ("tab:green", "s"), "mikv INT4": ("tab:purple", "D"),
    "rtn": ("tab:orange", "^"), "h2o": ("tab:red", "v"), "ablation": ("0.5", "x"),
}


def plot_family(row: dict) -> str:
    """Plot line of a row: ``mikv INT<b>`` by lo bits, ``rtn``, ``h2o``, or ``ablation``."""
    if row["family"] == "ablation" or row["policy"] not in ("mikv", "rtn", "h2o"):
        return row["family"]
    if row["policy"] != "mikv":
        return row["policy"]
    cfg = row["config"]
    k, v = cfg.get("k_bits", cfg.get("lo_bits")), cfg.get("v_bits", cfg.get("lo_bits"))
    return f"mikv INT{k}" if k == v else f"mikv K{k}/V{v}"


def envelope(points: Sequence[tuple[float, float]], lower_is_better: bool) -> list[tuple[float, float]]:
    """The points (x = size, ascending) that beat every smaller one: the family's quality-per-byte frontier."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or (y < out[-1][1] if lower_is_better else y > out[-1][1]):
            out.append((x, y))
    return out


def plot(summary: dict, path: Path, title: str = "") -> Path | None:
    """Quality vs real cache size (% of a 16-bit cache), one line per policy family."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in summary["rows"] if r["policy"] != "stock" and r["family"] != "ablation"]
    stock = next((r for r in summary["rows"] if r["policy"] == "stock"), None)
    panels = [("passkey_acc", "passkey accuracy (in-reach lengths)", False),
              ("needle_acc", "needle-in-prose accuracy", False),
              ("ppl_ratio", "PPL ratio vs full cache (chunked prefill)", True),
              ("ppl_decode_ratio", "PPL ratio vs full cache (prefix, then decode)", True),
              ("agreement_match", "greedy token agreement with full cache", False)]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    if not panels:
        return None
    ncol = 2 if len(panels) > 1 else 1
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.6 * nrow), squeeze=False)
    fams = sorted({plot_family(r) for r in rows}, key=lambda f: list(FAMILY_STYLE).index(f) if f in FAMILY_STYLE else 99)
    for ax, (key, name, logy) in zip(axes.flat, panels):
        for fam in fams:
            pts = sorted((100 * r["fraction_of_fp16"], r[key]) for r in rows if plot_family(r) == fam
                         and r.get(key) is not None)
            if not pts:
                continue
            color, marker = FAMILY_STYLE.get(fam, (None, "o"))
            front = envelope(pts, lower_is_better=logy)
            ax.plot([p[0] for p in front], [p[1] for p in front], marker=marker, color=color, label=fam, lw=1.4, ms=5)
            if len(front) < len(pts):   # the family's other formats: points off its envelope
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=12, color=color, alpha=0.35)
        ref = {"ppl_ratio": 1.0, "ppl_decode_ratio": 1.0, "agreement_match": 1.0}.get(
            key, stock.get(key) if stock else None)
        if ref is not None:
            ax.axhline(ref, color="k", ls="--", lw=0.8, label="full cache")
        if key == "ppl_ratio":
            ax.axhline(PPL_RATIO_MAX, color="k", ls=":", lw=0.7)
        if logy:
            from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

            ax.set_yscale("log")
            vals = [r[key] for r in rows if r.get(key) is not None] + [1.0]
            lo, hi = min(vals), max(vals)
            ticks = [t for t in (0.98, 1.0, 1.03, 1.1, 1.2, 1.5, 2, 3, 5, 10, 20) if lo * 0.995 <= t <= hi * 1.05]
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("KV cache size, % of a 16-bit cache (real layout)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
