"""Turn worker results into numbers, tables, plots and the default-preset pick.

All ratios are against the ``stock`` engine (vLLM's own full cache, same model,
same prompts). Cache sizes are the real page layout (``RegionLayout``) in bytes
per token per KV head and as % of a 16-bit dense cache (``4 * head_dim`` B);
``capacity`` is what the engine actually allocated (``num_gpu_blocks *
block_size`` tokens at the fixed ``kv_cache_memory_bytes``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import yaml

from .configs import EvalConfig, cache_cost

OUT_OF_REACH = 0.9          # full-cache passkey accuracy below this: the length is out of the model's reach
PPL_RATIO_MAX = 1.03        # default-pick rule
PASSKEY_SLACK_TRIALS = 1    # default-pick rule: within one trial of full cache


def _acc(recs: list[dict]) -> tuple[int, int]:
    return sum(bool(r["correct"]) for r in recs), len(recs)


def _group(recs: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(str(r[key]), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def summarize(results: Sequence[dict]) -> dict[str, Any]:
    """Rows (one per config) + the stock reference + out-of-reach lengths."""
    stock = next((r for r in results if r["config"]["policy"] == "stock"), None)
    ref_ppl = _ppl(stock) if stock else None
    ref_dec = _ppl(stock, "ppl_decode") if stock else None
    ref_agree = {r["id"]: r["tokens"] for r in stock["probes"].get("agreement", [])} if stock else {}
    ref_cap = stock["engine"]["capacity_tokens"] if stock else None
    out_of_reach: list[str] = []
    if stock:
        for L, recs in _group(stock["probes"].get("passkey", []), "cell").items():
            c, n = _acc(recs)
            if n and c / n < OUT_OF_REACH:
                out_of_reach.append(L)
    rows = []
    for res in results:
        cfg = EvalConfig.from_dict(res["config"])
        eng = res["engine"]
        cost = cache_cost(cfg, eng["head_dim"], eng["block_size"], 4 if eng.get("dtype") == "float32" else 2)
        row: dict[str, Any] = {
            "label": cfg.label, "family": cfg.family, "groups": list(cfg.groups), "policy": cfg.policy,
            "target": cfg.target, "ablation": cfg.ablation, "config": cfg.mikv,
            "bytes_per_token_per_head": cost.bytes_per_token,
            "fraction_of_fp16": cost.fraction_of_fp16,
            "paper_fraction": cost.paper_fraction,
            "engine_bytes_per_token_per_head": (eng.get("mikv_stats") or {}).get("bytes_per_token_per_head"),
            "implied_bytes_per_token_per_head": eng.get("implied_bytes_per_token_per_head"),
            "capacity_tokens": eng["capacity_tokens"],
            "capacity_vs_stock": eng["capacity_tokens"] / ref_cap if ref_cap else None,
            "seconds": res["timings"]["total"],
            "engine_start_seconds": res["timings"]["engine_start"],
            "cached": bool(res.get("cached")),
        }
        pk = {L: _acc(recs) for L, recs in _group(res["probes"].get("passkey", []), "cell").items()}
        row["passkey"] = {L: {"correct": c, "trials": n} for L, (c, n) in pk.items()}
        inreach = [(c, n) for L, (c, n) in pk.items() if L not in out_of_reach]
        row["passkey_correct"] = sum(c for c, _ in inreach)
        row["passkey_trials"] = sum(n for _, n in inreach)
        row["passkey_acc"] = row["passkey_correct"] / row["passkey_trials"] if row["passkey_trials"] else None
        nd = {d: _acc(recs) for d, recs in _group(res["probes"].get("needle", []), "cell").items()}
        row["needle"] = {d: {"correct": c, "trials": n} for d, (c, n) in nd.items()}
        nc, nn = sum(c for c, _ in nd.values()), sum(n for _, n in nd.values())
        row["needle_acc"] = nc / nn if nn else None
        ppl = _ppl(res)
        row["ppl"] = ppl
        row["ppl_ratio"] = ppl / ref_ppl if (ppl and ref_ppl) else None
        dec = _ppl(res, "ppl_decode")
        row["ppl_decode"] = dec
        row["ppl_decode_ratio"] = dec / ref_dec if (dec and ref_dec) else None
        matches, firsts, identical = [], [], 0
        for rec in res["probes"].get("agreement", []):
            ref = ref_agree.get(rec["id"])
            if ref is None:
                continue
            toks = rec["tokens"]
            n = min(len(ref), len(toks))
            if n == 0:
                continue
            matches.append(sum(a == b for a, b in zip(ref[:n], toks[:n])) / n)
            first = next((i for i in range(n) if ref[i] != toks[i]), n)
            firsts.append(first)
            identical += first == n
        row["agreement_match"] = statistics.fmean(matches) if matches else None
        row["first_divergence_mean"] = statistics.fmean(firsts) if firsts else None
        row["first_divergence_median"] = statistics.median(firsts) if firsts else None
        row["agreement_identical"] = identical if matches else None
        row["agreement_prompts"] = len(matches)
        rows.append(row)
    return {"rows": rows, "out_of_reach_lengths": out_of_reach,
            "agree_tokens": results[0]["workload"].get("agree_tokens") if results and "workload" in results[0] else None,
            "reference": {"ppl": ref_ppl, "ppl_decode": ref_dec, "capacity_tokens": ref_cap,
                          "passkey": next((r["passkey"] for r in rows if r["policy"] == "stock"), None)}}


def _ppl(res: dict | None, probe: str = "ppl") -> float | None:
    """Perplexity of a probe: ``ppl`` (chunked prefill) or ``ppl_decode`` (teacher-forced decode)."""
    if not res:
        return None
    recs = res["probes"].get(probe, [])
    nll = sum(r["nll"] for r in recs)
    n = sum(r["tokens"] for r in recs)
    return math.exp(nll / n) if n else None


# ------------------------------------------------------------------ default pick
def passes_rule(row: dict, stock: dict | None) -> bool:
    """The default-pick quality bar: passkey correct within ``PASSKEY_SLACK_TRIALS`` of the full cache
    over the same number of trials (in-reach lengths), PPL ratio <= ``PPL_RATIO_MAX``, and the decode
    PPL ratio too where it was measured."""
    dec = row.get("ppl_decode_ratio")
    return bool(stock is not None
                and row["passkey_trials"] == stock["passkey_trials"]
                and row["passkey_correct"] >= stock["passkey_correct"] - PASSKEY_SLACK_TRIALS
                and row["ppl_ratio"] is not None and row["ppl_ratio"] <= PPL_RATIO_MAX
                and (dec is None or dec <= PPL_RATIO_MAX))


def runs_on_any_head_dim(config: dict) -> bool:
    """Whether a config serves every model: the Hadamard rotation needs a power-of-two head_dim
    (64 / 128 / 256, not Phi-3's 96 or Phi-2's 80), so a rotated config cannot be the product default."""
    return not config.get("rotation")


def pick_default(summary: dict, families: Sequence[str] | None = None,
                 max_fraction: float | None = None) -> dict[str, Any]:
    """The fewest-bytes mikv-policy config that passes the quality bar (:func:`passes_rule`), that no
    baseline beats (:func:`dominating_baselines`: a rtn / h2o config with no more bytes that is at least
    as good on retrieval, PPL and decode PPL) and that runs on any head_dim (:func:`runs_on_any_head_dim`;
    ``mikv-vllm tune`` recommends rotated configs for a model that takes them).

    ``max_fraction`` restricts to configs at most that share of a 16-bit cache (the tuner's budget).
    Returns {"chosen": row | None, "candidates": [...], "rule": str, "bar_only": row | None} (``bar_only``:
    the fewest-bytes config passing the bar alone, when a baseline beats it)."""
    rows = summary["rows"]
    stock = next((r for r in rows if r["policy"] == "stock"), None)
    rule = (f"fewest bytes among mikv configs with passkey correct >= full-cache correct - "
            f"{PASSKEY_SLACK_TRIALS} (in-reach lengths), PPL ratio <= {PPL_RATIO_MAX} (chunked and decode), "
            f"no rtn / h2o config with no more bytes at least as good, and it runs on any head_dim (no rotation)")
    if stock is None:
        return {"chosen": None, "candidates": [], "rule": rule, "why": "no stock (full-cache) result"}
    ok = []
    for r in rows:
        if r["policy"] != "mikv" or (families and r["family"] not in families):
            continue
        if r["ablation"] and r["ablation"] != "base" and "frontier" not in r["groups"] and "sweep" not in r["groups"]:
            continue
        if max_fraction is not None and r["fraction_of_fp16"] > max_fraction + 1e-9:
            continue
        bar = passes_rule(r, stock)
        beaten = [b["label"] for b in dominating_baselines(summary, r)] if bar else []
        portable = runs_on_any_head_dim(r["config"])
        ok.append({**r, "passes_bar": bar, "beaten_by": beaten, "any_head_dim": portable,
                   "passes": bar and not beaten and portable})
    order = lambda r: (r["bytes_per_token_per_head"], r["ppl_ratio"])   # noqa: E731
    passing = sorted((r for r in ok if r["passes"]), key=order)
    bar_only = sorted((r for r in ok if r["passes_bar"] and r["beaten_by"]), key=order)
    chosen = passing[0] if passing else None
    return {"chosen": chosen, "candidates": ok, "rule": rule,
            "bar_only": bar_only[0] if bar_only and (chosen is None or order(bar_only[0]) < order(chosen)) else None,
            "rotated": next((r for r in sorted(ok, key=order) if r["passes_bar"] and not r["beaten_by"]
                             and not r["any_head_dim"] and (chosen is None or order(r) < order(chosen))), None)}


def best_under_budget(summary: dict, budget_fraction: float) -> dict[str, Any]:
    """Tuner: among all compressed configs within the budget, the best quality.

    Order: passes the quality bar first; then most passkey+needle correct; then lowest
    PPL ratio, lowest decode PPL ratio; then fewest bytes. Any family can win."""
    rows = [r for r in summary["rows"] if r["policy"] != "stock"
            and r["fraction_of_fp16"] <= budget_fraction + 1e-9]
    stock = next((r for r in summary["rows"] if r["policy"] == "stock"), None)

    def key(r):
        return (not passes_rule(r, stock), *_quality_key(r))

    ranked = sorted(rows, key=key)
    return {"best": ranked[0] if ranked else None, "ranked": [{**r, "passes": passes_rule(r, stock)} for r in ranked]}


def budget_comparison(summary: dict) -> list[dict[str, Any]]:
    """At each MiKV config's bytes: the best config of each family with no more bytes.

    Families: ``mikv`` (policy mikv), ``rtn`` (uniform, policy rtn), ``h2o`` (eviction);
    ablation variants are left out. Best = most retrieval correct (passkey at in-reach
    lengths + needle), then lowest PPL ratio, then fewest bytes. ``mikv_ge`` says whether
    the best MiKV point matches or beats every other family's best on both retrieval and
    PPL ratio (None when a family has no point within the budget)."""
    rows = [r for r in summary["rows"] if r["policy"] in ("mikv", "rtn", "h2o")
            and not (r["ablation"] and r["ablation"] != "base")]

    def best(policy, budget):
        cands = [r for r in rows if r["policy"] == policy and r["bytes_per_token_per_head"] <= budget]
        return min(cands, key=lambda r: (-retrieval_correct(r), r["ppl_ratio"] if r["ppl_ratio"] is not None else 1e9,
                                         r["bytes_per_token_per_head"]), default=None)

    out = []
    for budget in sorted({r["bytes_per_token_per_head"] for r in rows if r["policy"] == "mikv"}):
        entry: dict[str, Any] = {"budget": budget}
        for pol in ("mikv", "rtn", "h2o"):
            b = best(pol, budget)
            entry[pol] = b and {"label": b["label"], "bytes": b["bytes_per_token_per_head"],
                                "retrieval": retrieval_correct(b),
                                "retrieval_trials": b["passkey_trials"] + sum(v["trials"] for v in b["needle"].values()),
                                "ppl_ratio": b["ppl_ratio"]}
        m = entry["mikv"]
        for pol in ("rtn", "h2o"):
            o = entry[pol]
            entry[f"mikv_ge_{pol}"] = None if o is None else {
                "retrieval": m["retrieval"] >= o["retrieval"],
                "ppl": (m["ppl_ratio"] or 1e9) <= (o["ppl_ratio"] or 1e9) + 1e-12}
        out.append(entry)
    return out


def needle_counts(r: dict) -> tuple[int, int]:
    """(correct, trials) of the needle probe, summed over depths."""
    needle = (r.get("needle") or {}).values()
    return sum(v["correct"] for v in needle), sum(v["trials"] for v in needle)


def retrieval_correct(r: dict) -> int:
    """Passkey (in-reach lengths) + needle trials answered correctly."""
    return r["passkey_correct"] + needle_counts(r)[0]


def _quality_key(r: dict):
    """Best first: most retrieval correct, lowest PPL ratio, lowest decode PPL ratio, fewest bytes."""
    big = 1e9
    return (-retrieval_correct(r), r["ppl_ratio"] if r["ppl_ratio"] is not None else big,
            r.get("ppl_decode_ratio") if r.get("ppl_decode_ratio") is not None else big,
            r["bytes_per_token_per_head"])


def best_by_family(summary: dict, budget_bytes: float) -> dict[str, dict | None]:
    """The best config (:func:`_quality_key`) of each policy family with at most ``budget_bytes``."""
    rows = [r for r in summary["rows"] if not (r.get("ablation") and r["ablation"] != "base")]
    return {pol: min((r for r in rows if r["policy"] == pol and r["bytes_per_token_per_head"] <= budget_bytes + 1e-9),
                     key=_quality_key, default=None) for pol in ("mikv", "rtn", "h2o")}


def at_least_as_good(a: dict, b: dict) -> bool:
    """``a`` matches or beats ``b`` on retrieval, PPL ratio and (when both have it) decode PPL ratio."""
    def le(x, y):
        return x is not None and (y is None or x <= y + 1e-12)
    dec_a, dec_b = a.get("ppl_decode_ratio"), b.get("ppl_decode_ratio")
    return (retrieval_correct(a) >= retrieval_correct(b) and le(a["ppl_ratio"], b["ppl_ratio"])
            and (dec_a is None or dec_b is None or dec_a <= dec_b + 1e-12))


def dominating_baselines(summary: dict, row: dict) -> list[dict]:
    """Baseline (rtn / h2o) configs with no more bytes than ``row`` that are at least as good."""
    return [r for r in summary["rows"] if r["policy"] in ("rtn", "h2o")
            and r["bytes_per_token_per_head"] <= row["bytes_per_token_per_head"] + 1e-9
            and at_least_as_good(r, row)]


def headline_budgets(head_dim: int) -> list[tuple[str, float]]:
    """(name, bytes per token per head): 20 % of a 16-bit cache (the paper's "80 % compression") and
    the bytes of uniform INT4 with fp16 scale+zero per half head vector (vLLM-style INT4 baseline)."""
    from ..config import preset
    from ..core.layout import RegionLayout

    int4 = RegionLayout.build(preset("rtn-int4"), 128, head_dim).content_bytes
    return [(f"20 % of a 16-bit cache (paper's 80 % compression)", 0.2 * 4 * head_dim),
            (f"uniform INT4 ({int4} B)", float(int4))]


def headline_rows(rows: Sequence[dict], head_dim: int) -> list[dict]:
    """The best row (:func:`best_by_family`) of each family at each headline budget, without repeats."""
    out: list[dict] = []
    for _, budget in headline_budgets(head_dim):
        for r in best_by_family({"rows": list(rows)}, budget).values():
            if r is not None and all(r is not o for o in out):
                out.append(r)
    return out


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


# ------------------------------------------------------------------ rendering
def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


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
             + (f" (command: `{meta['command']}`)" if meta.get("command") else ""), ""]
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
                      f"PPL ratio {_f(rot['ppl_ratio'])}, decode {_f(rot.get('ppl_decode_ratio'))}); it needs a "
                      f"power-of-two head_dim, so it is `mikv-vllm tune`'s to recommend, not the default.\n"]
        cand = _by_bytes(pick.get("candidates", []))
        if cand:
            parts += ["| candidate | B/token/head | passkey | PPL ratio | PPL ratio, decode | quality bar | "
                      "baseline at least as good | any head_dim | passes |", "|---|---|---|---|---|---|---|---|---|"]
            parts += [f"| {r['label']} | {r['bytes_per_token_per_head']:.0f} | {r['passkey_correct']}/"
                      f"{r['passkey_trials']} | {_f(r['ppl_ratio'])} | {_f(r.get('ppl_decode_ratio'))} | "
                      f"{'yes' if r['passes_bar'] else 'no'} | {', '.join(r['beaten_by']) or '-'} | "
                      f"{'yes' if r.get('any_head_dim', True) else 'no (rotation)'} | "
                      f"{'yes' if r['passes'] else 'no'} |" for r in cand]
            parts.append("")
    return "\n".join(parts)


def to_yaml(config: dict, name: str | None = None) -> str:
    """A preset YAML (``mikv: {...}``) loadable with ``--mikv-config FILE``."""
    values = {k: round(v, 6) if isinstance(v, float) else v for k, v in config.items()}
    if name:
        values["name"] = name
    return yaml.safe_dump({"mikv": values}, sort_keys=False)


FAMILY_STYLE = {
    "mikv INT2": ("tab:blue", "o"), "mikv INT3": ("tab:green", "s"), "mikv INT4": ("tab:purple", "D"),
    "rtn": ("tab:orange", "^"), "h2o": ("tab:red", "v"), "ablation": ("0.5", "x"),
}


def plot_family(row: dict) -> str:
    """Plot line of a row: ``mikv INT<b>`` by lo bits, ``rtn``, ``h2o``, or ``ablation``."""
    if row["family"] == "ablation" or row["policy"] not in ("mikv", "rtn", "h2o"):
        return row["family"]
    return f"mikv INT{row['config']['lo_bits']}" if row["policy"] == "mikv" else row["policy"]


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


def write_report(results: Sequence[dict], out_dir: Path, meta: dict, with_pick: bool = True) -> dict[str, Any]:
    """Write summary.json, results.md and quality.png into ``out_dir``; return the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
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
