"""The default-pick rule and the rankings built on it: the quality bar, baselines that dominate a config,
the tuner's best under a budget, the best of each family at equal bytes and at the headline budgets."""

from __future__ import annotations

from typing import Any, Sequence

from ..configs import engine_key

PPL_RATIO_MAX = 1.03        # default-pick rule
PASSKEY_SLACK_TRIALS = 1    # default-pick rule: within one trial of full cache


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


def runs_on_any_head_dim(row: dict, passing: set[str]) -> bool:
    """Whether a config serves every model at the quality bar. The Hadamard rotation needs a power-of-two
    head_dim (64 / 128 / 256, not Phi-3's 96 or Phi-2's 80); elsewhere a rotated config serves its
    unrotated variant (``MiKVConfig.for_head_dim``). So: unrotated, or that fallback's engine key is
    in ``passing`` (the keys of the rows that pass the bar)."""
    config = row["config"] or {}
    return not config.get("rotation") or engine_key({**config, "rotation": False}) in passing


def pick_default(summary: dict, families: Sequence[str] | None = None,
                 max_fraction: float | None = None) -> dict[str, Any]:
    """The fewest-bytes mikv-policy config that passes the quality bar (:func:`passes_rule`), that no
    baseline beats (:func:`dominating_baselines`: a rtn / h2o config with no more bytes that is at least
    as good on retrieval, PPL and decode PPL) and that serves any head_dim at the bar
    (:func:`runs_on_any_head_dim`: no rotation, or its unrotated fallback passes too; ``mikv-vllm tune``
    recommends the other rotated configs for a model that takes them).

    ``max_fraction`` restricts to configs at most that share of a 16-bit cache (the tuner's budget).
    Returns {"chosen": row | None, "candidates": [...], "rule": str, "bar_only": row | None} (``bar_only``:
    the fewest-bytes config passing the bar alone, when a baseline beats it)."""
    rows = summary["rows"]
    stock = next((r for r in rows if r["policy"] == "stock"), None)
    rule = (f"fewest bytes among mikv configs with passkey correct >= full-cache correct - "
            f"{PASSKEY_SLACK_TRIALS} (in-reach lengths), PPL ratio <= {PPL_RATIO_MAX} (chunked and decode), "
            f"no rtn / h2o config with no more bytes at least as good, and it serves any head_dim at that bar "
            f"(no rotation, or its unrotated fallback passes too)")
    if stock is None:
        return {"chosen": None, "candidates": [], "rule": rule, "why": "no stock (full-cache) result"}
    passing_keys = {engine_key(r["config"]) for r in rows if r["config"] and passes_rule(r, stock)}
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
        portable = runs_on_any_head_dim(r, passing_keys)
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
    from ...config import preset
    from ...core.layout import RegionLayout

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
