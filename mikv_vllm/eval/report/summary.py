"""Worker results -> one row per config: real bytes, capacity, passkey / needle accuracy, PPL ratios, agreement.

All ratios are against the ``stock`` engine (vLLM's own full cache, same model,
same prompts). Cache sizes are the real page layout (``RegionLayout``) in bytes
per token per KV head and as % of a 16-bit dense cache (``4 * head_dim`` B);
``capacity`` is what the engine actually allocated (``num_gpu_blocks *
block_size`` tokens at the fixed ``kv_cache_memory_bytes``).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from ..configs import EvalConfig, cache_cost

OUT_OF_REACH = 0.9          # full-cache passkey accuracy below this: the length is out of the model's reach


def _acc(recs: list[dict]) -> tuple[int, int]:
    return sum(bool(r["correct"]) for r in recs), len(recs)


def _group(recs: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in recs:
        out.setdefault(str(r[key]), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def summarize(results: Sequence[dict], carried: Sequence[dict] = ()) -> dict[str, Any]:
    """Rows (one per config) + the stock reference + out-of-reach lengths. ``carried``: rows of earlier
    reports of the same workload (:mod:`..reuse`), appended with their ratios taken against this stock."""
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
    rows += [_rebased(r, out_of_reach, ref_ppl, ref_dec, ref_cap) for r in carried]
    return {"rows": rows, "out_of_reach_lengths": out_of_reach,
            "agree_tokens": results[0]["workload"].get("agree_tokens") if results and "workload" in results[0] else None,
            "reference": {"ppl": ref_ppl, "ppl_decode": ref_dec, "capacity_tokens": ref_cap,
                          "passkey": next((r["passkey"] for r in rows if r["policy"] == "stock"), None)}}


def _rebased(row: dict, out_of_reach: Sequence[str], ref_ppl: float | None, ref_dec: float | None,
             ref_cap: int | None) -> dict:
    """A carried row with its in-reach passkeys and ratios against this run's stock."""
    row = dict(row)
    inreach = [v for L, v in row["passkey"].items() if L not in out_of_reach]
    row["passkey_correct"] = sum(v["correct"] for v in inreach)
    row["passkey_trials"] = sum(v["trials"] for v in inreach)
    row["passkey_acc"] = row["passkey_correct"] / row["passkey_trials"] if row["passkey_trials"] else None
    row["ppl_ratio"] = row["ppl"] / ref_ppl if (row.get("ppl") and ref_ppl) else None
    row["ppl_decode_ratio"] = row["ppl_decode"] / ref_dec if (row.get("ppl_decode") and ref_dec) else None
    row["capacity_vs_stock"] = row["capacity_tokens"] / ref_cap if ref_cap else None
    return row


def _ppl(res: dict | None, probe: str = "ppl") -> float | None:
    """Perplexity of a probe: ``ppl`` (chunked prefill) or ``ppl_decode`` (teacher-forced decode)."""
    if not res:
        return None
    recs = res["probes"].get(probe, [])
    nll = sum(r["nll"] for r in recs)
    n = sum(r["tokens"] for r in recs)
    return math.exp(nll / n) if n else None
