"""Markdown of a summary: the full and compact tables, the equal-bytes and headline tables, the
whole results.md with the default pick, and a pick as a preset YAML."""

from __future__ import annotations

import json
from typing import Sequence

import yaml

from .rule import (best_by_family, budget_comparison, dominating_baselines, headline_budgets, needle_counts,
                   retrieval_correct)
from .summary import OUT_OF_REACH


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def headline_table(summary: dict, head_dim: int) -> str:
    """Markdown: the best of each family at each headline budget, with its distance from the full cache."""
    lengths = sorted({L for r in summary["rows"] for L in r["passkey"]}, key=float)
    stock = next((r for r in summary["rows"] if r["policy"] == "stock"), None)
    head = ["budget", "family", "best config", "B/token/head"] + [f"passkey {int(L) / 1024:g}k" for L in lengths]
    head += ["needle", "PPL ratio", "PPL ratio, decode"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, budget in headline_budgets(head_dim):
        for pol, r in best_by_family(summary, budget).items():
            if r is None:
                lines.append(f"| {name} | {pol} | - | - |" + " - |" * (len(lengths) + 3))
                continue
            nd = needle_counts(r)
            cells = [name, pol, r["label"], f"{r['bytes_per_token_per_head']:.0f}"]
            cells += [_cnt(r["passkey"].get(L)) for L in lengths]
            cells += [f"{nd[0]}/{nd[1]}" if nd[1] else "-", _f(r["ppl_ratio"]), _f(r.get("ppl_decode_ratio"))]
            lines.append("| " + " | ".join(cells) + " |")
    if stock:
        lines.append("")
        lines.append(f"Full cache: passkey " + ", ".join(_cnt(stock["passkey"].get(L)) for L in lengths)
                     + f"; PPL ratio 1 by definition (PPL {_f(stock['ppl'], '{:.2f}')}"
                     + (f", decode {_f(stock.get('ppl_decode'), '{:.2f}')}" if stock.get("ppl_decode") else "") + ").")
    return "\n".join(lines)


def budget_table(entries: Sequence[dict]) -> str:
    """Markdown of :func:`budget_comparison`."""
    def cell(e):
        if e is None:
            return "-"
        return f"{e['label']} ({e['bytes']:.0f} B): {e['retrieval']}/{e['retrieval_trials']}, {_f(e['ppl_ratio'])}"

    def verdict(v):
        if v is None:
            return "-"
        return ("retrieval " + ("yes" if v["retrieval"] else "**no**") + ", PPL " + ("yes" if v["ppl"] else "**no**"))

    lines = ["| budget (B/token/head) | best MiKV | best RTN | best H2O | MiKV >= RTN | MiKV >= H2O |",
             "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['budget']:.0f} | {cell(e['mikv'])} | {cell(e['rtn'])} | {cell(e['h2o'])} | "
                     f"{verdict(e['mikv_ge_rtn'])} | {verdict(e['mikv_ge_h2o'])} |")
    return "\n".join(lines)


def compact_table(rows: Sequence[dict]) -> str:
    """Markdown: config, bytes, share of fp16, retrieval and both PPL ratios, one line per row."""
    lines = ["| config | B/token/head | % of fp16 | passkey | needle | PPL ratio | PPL ratio, decode |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        nd = needle_counts(r)
        lines.append(f"| {r['label']} | {r['bytes_per_token_per_head']:.0f} | {100 * r['fraction_of_fp16']:.1f} | "
                     f"{r['passkey_correct']}/{r['passkey_trials']} | {nd[0]}/{nd[1] if nd[1] else '-'} | "
                     f"{_f(r['ppl_ratio'])} | {_f(r.get('ppl_decode_ratio'))} |")
    return "\n".join(lines)


def _cnt(d: dict | None) -> str:
    return "-" if not d else f"{d['correct']}/{d['trials']}"


def markdown_table(summary: dict, rows: Sequence[dict] | None = None, extra_first: str | None = None) -> str:
    rows = list(summary["rows"] if rows is None else rows)
    lengths = sorted({L for r in summary["rows"] for L in r["passkey"]}, key=float)
    depths = sorted({d for r in summary["rows"] for d in r["needle"]}, key=float)
    oor = set(summary["out_of_reach_lengths"])
    head = ["config"] + ([extra_first] if extra_first else []) + [
        "B/token/head", "% of fp16", "capacity (tokens)", "x stock"]
    head += [f"passkey {int(L) / 1024:g}k" + (" (out of reach)" if L in oor else "") for L in lengths]
    if depths:
        head += ["needle " + "/".join(f"{float(d):g}" for d in depths), "needle"]
    head += ["PPL", "PPL ratio"]
    decode = any(r.get("ppl_decode_ratio") is not None for r in summary["rows"])
    if decode:
        head.append("PPL ratio, decode")
    head += [f"agree@{summary.get('agree_tokens') or 64}", "1st diverg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"]]
        if extra_first:
            cells.append(str(r.get(extra_first) or "-"))
        cells += [f"{r['bytes_per_token_per_head']:.0f}", f"{100 * r['fraction_of_fp16']:.1f}",
                  f"{r['capacity_tokens']:,}", _f(r["capacity_vs_stock"], "{:.2f}")]
        cells += [_cnt(r["passkey"].get(L)) for L in lengths]
        if depths:
            cells.append(" ".join(str(r["needle"].get(d, {}).get("correct", "-")) for d in depths))
            cells.append(_f(r["needle_acc"], "{:.2f}"))
        cells += [_f(r["ppl"], "{:.2f}"), _f(r["ppl_ratio"])]
        if decode:
            cells.append(_f(r.get("ppl_decode_ratio")))
        cells += [_f(r["agreement_match"], "{:.2f}"), _f(r["first_divergence_mean"], "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_bytes(rows):
    return sorted(rows, key=lambda r: (r["bytes_per_token_per_head"], r["label"]))


def render_markdown(summary: dict, meta: dict, pick: dict | None) -> str:
    rows = summary["rows"]
    stock = [r for r in rows if r["policy"] == "stock"]
    parts = [f"# MiKV quality benchmark\n",
             f"- model: `{meta.get('model')}`; engine block size {meta.get('block_size')}, head_dim "
             f"{meta.get('head_dim')}, {meta.get('num_layers')} layers x {meta.get('num_kv_heads')} KV heads, "
             f"model dtype {meta.get('dtype')}; KV memory {meta.get('kv_cache_memory_bytes', 0) / 2**30:g} GiB",
             f"- prose: {meta.get('corpus', {}).get('description')} (`{meta.get('corpus', {}).get('source')}`)",
             f"- workload: `{json.dumps(meta.get('workload'))}`",
             f"- B/token/head = real page layout (RegionLayout.content_bytes, bookkeeping included); "
             f"% of fp16 = that / {4 * int(meta.get('head_dim') or 0)} B; capacity = engine's "
             f"num_gpu_blocks x block_size at the fixed KV memory; x stock = capacity / stock "
             f"engine's (the stock engine stores fp32 K/V, the model dtype)",
             f"- out-of-reach passkey lengths (full-cache accuracy < {OUT_OF_REACH:.0%}): "
             f"{', '.join(summary['out_of_reach_lengths']) or 'none'}; they are left out of passkey accuracy",
             f"- runtime: {sum(r.get('seconds') or 0 for r in rows) / 60:.1f} engine-min over {len(rows)} engines "
             f"(each run's own time, cached runs included); this invocation {meta.get('runtime_s', 0) / 60:.1f} "
             f"min wall with {meta.get('jobs', 1)} job(s)"
             + (f" (command: `{meta['command']}`)" if meta.get("command") else "")]
    if meta.get("reused"):
        parts += ["- reused: " + ", ".join(f"{n} rows from `{p}`" for p, n in meta["reused"].items())
                  + " (same workload, model, KV memory and page bytes; their ratios are against this run's stock)"]
    parts += [""]
    sweep = [r for r in rows if "sweep" in r["groups"]]
    if sweep:
        parts += ["## Policies x cache size (sweep)\n",
                  "Target = nominal share of a 16-bit cache; the real layout closest to it is used.\n",
                  markdown_table(summary, stock + sorted(sweep, key=lambda r: (r["family"], r["target"] or 0)),
                                 extra_first="target"), ""]
    front = [r for r in rows if "frontier" in r["groups"]]
    if front:
        parts += ["## Frontier (lo bits x r, H2O ratios), sorted by bytes\n",
                  markdown_table(summary, stock + _by_bytes(front)), "",
                  "Compact (README's table): passkey summed over in-reach lengths, needle over depths.\n",
                  compact_table(stock + _by_bytes(front)), ""]
    abl = [r for r in rows if "ablation" in r["groups"]]
    if abl:
        parts += ["## Ablations (one knob of mikv-paper at a time)\n",
                  markdown_table(summary, stock + abl, extra_first="ablation"), ""]
    other = [r for r in rows if not ({"sweep", "frontier", "ablation"} & set(r["groups"])) and r not in stock]
    if other:
        parts += ["## Other configs\n", markdown_table(summary, stock + _by_bytes(other)), ""]
    budgets = budget_comparison(summary)
    if budgets and any(e["rtn"] or e["h2o"] for e in budgets):
        parts += ["## At equal bytes: best of each family with no more bytes\n",
                  "Cells: config (bytes): retrieval correct (passkey at in-reach lengths + needle), PPL ratio. "
                  "Best = most retrieval, then lowest PPL ratio.\n",
                  budget_table(budgets), ""]
    if meta.get("head_dim") and any(r["policy"] != "stock" for r in rows):
        parts += ["## Best of each family at the headline budgets\n",
                  "Best = most retrieval correct (passkey at in-reach lengths + needle), then lowest PPL ratio "
                  "(chunked), then lowest decode PPL ratio, then fewest bytes.\n",
                  headline_table(summary, int(meta["head_dim"])), ""]
    if pick is not None:
        parts += ["## Default pick\n", f"Rule: {pick['rule']}.\n"]
        ch = pick.get("chosen")
        if ch:
            parts += [f"**Chosen: `{ch['label']}`** - {ch['bytes_per_token_per_head']:.0f} B/token/head "
                      f"({100 * ch['fraction_of_fp16']:.1f} % of fp16), passkey {ch['passkey_correct']}/"
                      f"{ch['passkey_trials']}, PPL ratio {ch['ppl_ratio']:.3f}.\n",
                      "```yaml\n" + to_yaml(ch["config"], name="mikv") + "```\n"]
            dom = dominating_baselines(summary, ch)
            parts += [("**A baseline is at least as good at no more bytes:** " + ", ".join(
                f"`{r['label']}` ({r['bytes_per_token_per_head']:.0f} B: retrieval {retrieval_correct(r)}, "
                f"PPL ratio {_f(r['ppl_ratio'])}, decode {_f(r.get('ppl_decode_ratio'))})" for r in _by_bytes(dom))
                if dom else "No baseline (rtn, h2o) with no more bytes is at least as good on retrieval, PPL "
                "ratio and decode PPL ratio.") + "\n"]
        else:
            parts += [f"No mikv config passes the rule{(': ' + pick['why']) if pick.get('why') else ''}.\n"]
        bo = pick.get("bar_only")
        if bo:
            parts += [f"Fewer bytes pass the quality bar alone: `{bo['label']}` ({bo['bytes_per_token_per_head']:.0f} "
                      f"B), but a baseline is at least as good there: {', '.join(bo['beaten_by'])}.\n"]
        rot = pick.get("rotated")
        if rot:
            parts += [f"Fewer bytes pass with the rotation: `{rot['label']}` ({rot['bytes_per_token_per_head']:.0f} B, "
                      f"PPL ratio {_f(rot['ppl_ratio'])}, decode {_f(rot.get('ppl_decode_ratio'))}); its unrotated "
                      f"fallback (served on a head_dim that is not a power of two) is not among the rows that pass, "
                      f"so it is `mikv-vllm tune`'s to recommend, not the default.\n"]
        cand = _by_bytes(pick.get("candidates", []))
        if cand:
            parts += ["| candidate | B/token/head | passkey | PPL ratio | PPL ratio, decode | quality bar | "
                      "baseline at least as good | any head_dim at the bar | passes |", "|---|---|---|---|---|---|---|---|---|"]
            parts += [f"| {r['label']} | {r['bytes_per_token_per_head']:.0f} | {r['passkey_correct']}/"
                      f"{r['passkey_trials']} | {_f(r['ppl_ratio'])} | {_f(r.get('ppl_decode_ratio'))} | "
                      f"{'yes' if r['passes_bar'] else 'no'} | {', '.join(r['beaten_by']) or '-'} | "
                      f"{'yes' if r.get('any_head_dim', True) else 'no (rotated; fallback not passing here)'} | "
                      f"{'yes' if r['passes'] else 'no'} |" for r in cand]
            parts.append("")
    return "\n".join(parts)


def to_yaml(config: dict, name: str | None = None) -> str:
    """A preset YAML (``mikv: {...}``) loadable with ``--mikv-config FILE``."""
    values = {k: round(v, 6) if isinstance(v, float) else v for k, v in config.items()}
    if name:
        values["name"] = name
    return yaml.safe_dump({"mikv": values}, sort_keys=False)
