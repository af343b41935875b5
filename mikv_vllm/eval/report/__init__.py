"""Turn worker results into numbers, tables, plots and the default-preset pick.

:mod:`.summary` makes one row per config (ratios against the ``stock`` engine), :mod:`.rule` holds the
default-pick rule and the rankings, :mod:`.markdown` the tables and results.md, :mod:`.plot` the figure;
:func:`write_report` writes all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .markdown import budget_table, compact_table, headline_table, markdown_table, render_markdown, to_yaml
from .plot import FAMILY_STYLE, envelope, plot, plot_family
from .rule import (PASSKEY_SLACK_TRIALS, PPL_RATIO_MAX, at_least_as_good, best_by_family, best_under_budget,
                   budget_comparison, dominating_baselines, headline_budgets, headline_rows, needle_counts,
                   passes_rule, pick_default, retrieval_correct, runs_on_any_head_dim)
from .summary import OUT_OF_REACH, summarize

__all__ = ["FAMILY_STYLE", "OUT_OF_REACH", "PASSKEY_SLACK_TRIALS", "PPL_RATIO_MAX", "at_least_as_good",
           "best_by_family", "best_under_budget", "budget_comparison", "budget_table", "compact_table",
           "dominating_baselines", "envelope", "headline_budgets", "headline_rows", "headline_table",
           "markdown_table", "needle_counts", "passes_rule", "pick_default", "plot", "plot_family",
           "render_markdown", "retrieval_correct", "runs_on_any_head_dim", "summarize", "to_yaml", "write_report"]


def write_report(results: Sequence[dict], out_dir: Path, meta: dict, with_pick: bool = True,
                 carried: Sequence[dict] = ()) -> dict[str, Any]:
    """Write summary.json, results.md and quality.png into ``out_dir``; return the summary. ``carried``:
    rows reused from earlier reports (``--reuse``), listed in the meta."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, carried)
    if carried:
        meta["reused"] = {p: sum(r["reused_from"] == p for r in carried) for p in dict.fromkeys(r["reused_from"] for r in carried)}
    if results:
        eng = results[0]["engine"]
        for k in ("block_size", "head_dim", "num_layers", "num_kv_heads", "dtype", "kv_cache_memory_bytes"):
            meta.setdefault(k, eng.get(k))
    pick = pick_default(summary) if with_pick else None
    md = render_markdown(summary, meta, pick)
    (out_dir / "results.md").write_text(md)
    png = plot(summary, out_dir / "quality.png", title=f"{Path(str(meta.get('model'))).name}: quality vs KV bytes")
    doc = {"meta": meta, "summary": summary, "budget_comparison": budget_comparison(summary),
           "headline": {name: {pol: r and r["label"] for pol, r in best_by_family(summary, b).items()}
                        for name, b in headline_budgets(int(meta["head_dim"]))} if meta.get("head_dim") else None,
           "default_pick": pick and {
        "rule": pick["rule"], "chosen": pick["chosen"] and pick["chosen"]["label"],
        "chosen_config": pick["chosen"] and pick["chosen"]["config"],
        "dominated_by": pick["chosen"] and [r["label"] for r in dominating_baselines(summary, pick["chosen"])]}}
    (out_dir / "summary.json").write_text(json.dumps(doc, indent=1, default=str))
    summary["markdown"] = md
    summary["plot"] = str(png) if png else None
    summary["pick"] = pick
    return summary
