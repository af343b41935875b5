"""Smoke of the quality benchmark (``mikv-vllm eval``), end to end on the embedded model.

Runs the ``smoke`` suite - full cache (stock), ``mikv-paper``, H2O at the same
real bytes per token, uniform INT2 (``rtn``) - on passkey retrieval at one
length, plus a tiny perplexity / agreement / needle workload so that every
probe and the report are exercised, and checks the paper's ordering on
passkey: mikv-paper >= H2O at equal bytes, and > uniform INT2.

Greedy decoding and fixed seeds make every number deterministic for a given
engine build, so the assertions are not flaky; 8 trials leave margin (measured
on this model at 512 tokens: mikv-paper 8/8, H2O at equal bytes 2/8 - the
evicted needle is gone - and uniform INT2 2/8). About 3-4 min on an idle
2-core machine (4 engines, 2 at a time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest


LENGTH = 512
TRIALS = 8


@pytest.fixture(scope="module")
def smoke(model_dir, tmp_path_factory):
    from mikv_vllm.cli import main

    out = tmp_path_factory.mktemp("quality-smoke")
    rc = main(["eval", "--suite", "smoke", "--model", str(model_dir), "--out", str(out), "--no-progress",
               "--jobs", "2", "--lengths", str(LENGTH), "--trials", str(TRIALS),
               "--needle-length", "384", "--needle-depths", "0.5", "--needle-trials", "1",
               "--ppl-windows", "1", "--ppl-length", "384", "--ppl-chunk", "128",
               "--agree-prompts", "1", "--agree-prompt-len", "128", "--agree-tokens", "16",
               "--decode-windows", "1"])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    rows = {r["label"]: r for r in doc["summary"]["rows"]}
    return out, doc, rows


def _row(rows, prefix):
    found = [r for label, r in rows.items() if label.startswith(prefix)]
    assert len(found) == 1, f"expected one {prefix!r} row, got {sorted(rows)}"
    return found[0]


@pytest.mark.engine
def test_harness_outputs(smoke):
    out, doc, rows = smoke
    assert (out / "results.md").read_text().startswith("# MiKV quality benchmark")
    assert (out / "quality.png").stat().st_size > 1000
    assert len(rows) == 4
    stock = rows["stock"]
    assert stock["passkey"][str(LENGTH)]["trials"] == TRIALS
    assert stock["passkey_acc"] >= 0.9, "full cache must solve the smoke passkey (harness sanity)"
    assert stock["ppl"] is not None and 1 < stock["ppl"] < 200
    assert stock["agreement_match"] == 1.0 and stock["ppl_ratio"] == pytest.approx(1.0)
    for label, r in rows.items():
        assert r["passkey"][str(LENGTH)]["trials"] == TRIALS, label
        assert r["ppl"] is not None and r["agreement_match"] is not None, label
        assert r["needle"], label
        assert r["ppl_decode"] is not None, label


@pytest.mark.engine
def test_decode_perplexity_reads_the_compressed_cache(smoke):
    """The forced decode steps (288-token prefix, 95 scored steps) score every config against the same text:
    the full cache defines 1, and the lossy caches are worse in the order of their low-precision bits."""
    _, _, rows = smoke
    assert rows["stock"]["ppl_decode_ratio"] == pytest.approx(1.0) and 1 < rows["stock"]["ppl_decode"] < 200
    paper, rtn = _row(rows, "mikv-paper"), _row(rows, "rtn")
    assert paper["ppl_decode_ratio"] > 1.001, paper["ppl_decode_ratio"]   # exactly 1 = the cache was not read
    assert rtn["ppl_decode_ratio"] > paper["ppl_decode_ratio"]


@pytest.mark.engine
def test_reported_bytes_are_the_engines(smoke):
    _, doc, rows = smoke
    meta = doc["meta"]
    for label, r in rows.items():
        if r["policy"] == "stock":
            continue
        # the report's bytes are what the engine's own backend says it laid out ...
        assert r["engine_bytes_per_token_per_head"] is not None, label
        assert r["bytes_per_token_per_head"] == r["engine_bytes_per_token_per_head"], label
        # ... and what the engine allocated: KV memory / (capacity x layers x heads), within rounding
        assert r["implied_bytes_per_token_per_head"] == pytest.approx(r["bytes_per_token_per_head"], rel=0.01), label
        assert r["capacity_vs_stock"] > 1, label
    assert (meta["head_dim"], meta["block_size"]) == (64, 128)
    # worked by hand in tests/core/test_layout.py-style: INT2 r=0.2 at D=64, N=128: lo 48 + hi 26 slots x 256 B
    # / 128 = 52 + tags and slot scores 2 x 112 B / 128 + balancer 1 = 102.75 -> 103 B
    assert _row(rows, "mikv-paper")["bytes_per_token_per_head"] == 103


@pytest.mark.engine
def test_paper_ordering_on_passkey(smoke):
    _, _, rows = smoke
    paper = _row(rows, "mikv-paper")
    h2o = _row(rows, "h2o")
    rtn = _row(rows, "rtn")
    assert h2o["bytes_per_token_per_head"] == pytest.approx(paper["bytes_per_token_per_head"], rel=0.05)
    assert paper["passkey_correct"] >= h2o["passkey_correct"], (paper["passkey"], h2o["passkey"])
    assert paper["passkey_correct"] > rtn["passkey_correct"], (paper["passkey"], rtn["passkey"])


# ---------------------------------------------------------------- no engine needed
def test_sweep_cells_are_real_layouts_near_their_targets():
    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.eval import configs as C

    cells = C.sweep_configs(head_dim=64, block_size=128)
    assert {c.policy for c in cells} == {"mikv", "rtn", "h2o"}
    for c in cells:
        frac = RegionLayout.build(c.config(), 128, 64).content_bytes / 256
        assert abs(frac - c.target) <= C.TARGET_TOLERANCE * c.target, (c.label, frac, c.target)
    rtn20 = [c for c in cells if c.policy == "rtn" and c.target == 0.2]
    assert rtn20 and rtn20[0].mikv["k_bits"] == rtn20[0].mikv["v_bits"] == 2


def test_full_suite_dedupes_shared_configs():
    from mikv_vllm.eval.cli import suite_configs

    cfgs = suite_configs("full", 64, 128)
    keys = [c.key() for c in cfgs]
    assert len(keys) == len(set(keys))
    assert cfgs[0].policy == "stock"
    shared = [c for c in cfgs if "frontier" in c.groups and "sweep" in c.groups]
    assert shared, "rtn INT2/3/4 are both frontier points and sweep cells"


def test_equal_bytes_h2o_matches_paper_preset():
    from mikv_vllm.config import preset
    from mikv_vllm.eval.configs import bytes_of, equal_bytes_h2o

    paper = preset("mikv-paper")
    h2o = equal_bytes_h2o(paper, 64, 128)
    assert h2o.policy == "h2o"
    assert abs(bytes_of(h2o, 64, 128) - bytes_of(paper, 64, 128)) <= 4


class _CharTokenizer:
    bos_token_id = None

    def encode(self, text, add_special_tokens=True):
        return [ord(c) % 5000 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_workload_is_deterministic_and_complete():
    from mikv_vllm.eval.data import Corpus, TokenStream
    from mikv_vllm.eval.workload import Workload, build_requests

    corpus = Corpus(text=("Plain English prose sentence number one. " * 400), source="test", description="t",
                    sha256="x")
    w = Workload(passkey_lengths=(200, 400), passkey_trials=3, needle_length=300, needle_depths=(0.2, 0.8),
                 needle_trials=2, ppl_windows=2, ppl_length=256, ppl_chunk=64, agree_prompts=2,
                 agree_prompt_len=100, agree_tokens=8)
    tok = _CharTokenizer()
    a = build_requests(w, tok, TokenStream(tok, corpus))
    b = build_requests(w, tok, TokenStream(tok, corpus))
    assert [r.prompt for r in a] == [r.prompt for r in b]
    assert len(a) == w.num_requests()
    kinds = {r.probe for r in a}
    assert kinds == {"passkey", "needle", "ppl", "agreement", "ppl_decode"}
    windows = {r.cell: r.prompt["prompt_token_ids"] for r in a if r.probe == "ppl"}
    for r in a:
        if r.probe in ("passkey", "needle"):
            assert r.answer in r.prompt
        if r.probe == "ppl":
            assert r.prompt_logprobs and r.meta["skip"] == 64 and r.num_prompt_tokens == 256
        if r.probe == "ppl_decode":   # the same window: 3/4 prefilled whole, the rest forced one per step
            assert r.num_prompt_tokens == 192 and r.max_tokens == 64 and r.ignore_eos and not r.prompt_logprobs
            assert r.prompt["prompt_token_ids"] + r.forced == windows[r.cell]


def _fake_result(label, policy, mikv, passkey_ok, nll, tokens=None):
    return {
        "config": {"label": label, "policy": policy, "mikv": mikv, "family": policy, "groups": ["frontier"]},
        "engine": {"head_dim": 64, "block_size": 128, "capacity_tokens": 1000, "dtype": "float32"},
        "timings": {"total": 1.0, "engine_start": 1.0},
        "probes": {
            "passkey": [{"id": f"p{i}", "cell": "1024", "correct": i < passkey_ok} for i in range(10)],
            "ppl": [{"nll": nll, "tokens": 100}],
            "agreement": [{"id": "a0", "tokens": tokens or [1, 2, 3, 4]}],
        },
    }


def test_summary_and_default_rule():
    from mikv_vllm.eval.configs import mikv_config, rtn_config
    from mikv_vllm.eval.report import pick_default, summarize

    results = [
        _fake_result("stock", "stock", None, 10, 200.0),
        _fake_result("int2", "mikv", mikv_config(2, 0.05).to_dict(), 10, 210.0, [1, 2, 9, 9]),  # PPL too high
        _fake_result("int3", "mikv", mikv_config(3, 0.05).to_dict(), 9, 201.0),                # passes
        _fake_result("int4", "mikv", mikv_config(4, 0.2).to_dict(), 10, 200.0),                # passes, bigger
        _fake_result("rtn", "rtn", rtn_config(2).to_dict(), 0, 400.0),
    ]
    s = summarize(results)
    rows = {r["label"]: r for r in s["rows"]}
    assert rows["stock"]["ppl_ratio"] == 1.0 and rows["stock"]["agreement_match"] == 1.0
    assert rows["int2"]["agreement_match"] == 0.5 and rows["int2"]["first_divergence_mean"] == 2
    assert rows["int2"]["ppl_ratio"] > 1.03
    pick = pick_default(s)
    assert pick["chosen"]["label"] == "int3"


def test_budget_comparison_best_per_family_with_no_more_bytes():
    from mikv_vllm.eval.configs import h2o_config, mikv_config, rtn_config
    from mikv_vllm.eval.report import budget_comparison, budget_table, summarize

    results = [
        _fake_result("stock", "stock", None, 10, 200.0),
        _fake_result("int3", "mikv", mikv_config(3, 0.05).to_dict(), 9, 201.0),    # 80 B
        _fake_result("int4", "mikv", mikv_config(4, 0.2).to_dict(), 10, 200.0),    # 135 B
        _fake_result("rtn3", "rtn", rtn_config(3).to_dict(), 10, 202.0),           # 64 B
        _fake_result("h2o", "h2o", h2o_config(0.4).to_dict(), 3, 205.0),           # 112 B
    ]
    entries = {e["budget"]: e for e in budget_comparison(summarize(results))}
    assert set(entries) == {80.0, 135.0}
    e84, e140 = entries[80.0], entries[135.0]
    assert e84["mikv"]["label"] == "int3" and e84["rtn"]["label"] == "rtn3" and e84["h2o"] is None
    assert e84["mikv_ge_rtn"] == {"retrieval": False, "ppl": True} and e84["mikv_ge_h2o"] is None
    assert e140["mikv"]["label"] == "int4" and e140["h2o"]["label"] == "h2o"
    assert e140["mikv_ge_rtn"] == {"retrieval": True, "ppl": True}
    assert e140["mikv_ge_h2o"] == {"retrieval": True, "ppl": True}
    table = budget_table(list(entries.values()))
    assert "retrieval **no**, PPL yes" in table and table.count("\n") == 3


def test_pick_and_tuner_share_one_rule():
    """The default pick and the tuner judge a row by the same rule, trial counts included."""
    from mikv_vllm.eval.configs import mikv_config
    from mikv_vllm.eval.report import best_under_budget, pick_default, summarize

    short = _fake_result("int3-short", "mikv", mikv_config(3, 0.05).to_dict(), 9, 201.0)
    short["probes"]["passkey"] = short["probes"]["passkey"][:9]  # 9/9 correct, but one trial fewer
    results = [_fake_result("stock", "stock", None, 10, 200.0), short,
               _fake_result("int4", "mikv", mikv_config(4, 0.2).to_dict(), 10, 200.0)]
    s = summarize(results)
    picked = {r["label"]: r["passes"] for r in pick_default(s)["candidates"]}
    tuned = {r["label"]: r["passes"] for r in best_under_budget(s, 1.0)["ranked"]}
    assert picked == tuned == {"int3-short": False, "int4": True}


def test_default_pick_skips_configs_a_baseline_beats():
    """The product rule: the fewest-bytes MiKV config passing the bar that no rtn / h2o config with no more
    bytes matches; the cheaper one a baseline beats is reported as bar-only."""
    from mikv_vllm.eval.configs import mikv_config, rtn_config
    from mikv_vllm.eval.report import dominating_baselines, pick_default, render_markdown, summarize

    results = [
        _fake_result("stock", "stock", None, 10, 200.0),
        _fake_result("int3", "mikv", mikv_config(3, 0.05).to_dict(), 10, 202.5),             # 80 B, bar ok
        _fake_result("int4-lean", "mikv", mikv_config(4, 0.03, group_size=64, hi_dtype="float8_e4m3fn").to_dict(),
                     10, 200.5),                                                              # 78 B
        _fake_result("int4", "mikv", mikv_config(4, 0.2).to_dict(), 10, 200.0),              # 135 B
        _fake_result("rtn4", "rtn", rtn_config(4, group_size=64).to_dict(), 10, 201.0),      # 72 B
    ]
    s = summarize(results)
    rows = {r["label"]: r for r in s["rows"]}
    assert [r["label"] for r in dominating_baselines(s, rows["int3"])] == ["rtn4"]
    assert dominating_baselines(s, rows["int4-lean"]) == []          # 1.0025 < 1.005: rtn4 is worse
    pick = pick_default(s)
    assert pick["chosen"]["label"] == "int4-lean" and pick["bar_only"] is None
    # make the lean one worse than rtn4: int4 (more bytes) is chosen, nothing cheaper passes
    results[2] = _fake_result("int4-lean", "mikv", results[2]["config"]["mikv"], 10, 201.5)
    s = summarize(results)
    pick = pick_default(s)
    assert pick["chosen"]["label"] == "int4"
    assert {r["label"]: r["beaten_by"] for r in pick["candidates"]}["int3"] == ["rtn4"]
    md = render_markdown(s, {"head_dim": 64}, pick)
    assert "Best of each family at the headline budgets" in md and "| rtn4 |" not in md.split("Default pick")[1][:80]


def test_frontier_suite_takes_the_screens_near_frontier_configs():
    from mikv_vllm.eval import configs as C
    from mikv_vllm.eval import frontier as F

    def row(label, policy, b, pk, ppl, **cfg):
        c = (C.rtn_config(cfg.pop("lo_bits"), **cfg) if policy == "rtn" else C.mikv_config(cfg.pop("lo_bits"),
             cfg.pop("r"), **cfg))
        return {"label": label, "policy": policy, "family": policy, "config": c.to_dict(), "ablation": None,
                "bytes_per_token_per_head": b, "passkey_correct": pk, "ppl_ratio": ppl}
    rows = [row("a", "mikv", 60, 8, 1.050, lo_bits=3, r=0.05), row("b", "mikv", 62, 8, 1.049, lo_bits=3, r=0.1),
            row("c", "mikv", 70, 8, 1.080, lo_bits=2, r=0.1), row("d", "mikv", 78, 8, 1.001, lo_bits=4, r=0.03),
            row("e", "mikv", 79, 7, 1.000, lo_bits=4, r=0.05), row("f", "rtn", 64, 8, 1.07, lo_bits=3),
            row("g", "mikv", 200, 8, 1.0, lo_bits=4, r=0.5), row("h", "mikv", 50, 8, 1.3, lo_bits=2, r=0.1)]
    near = {r["label"] for r in F.frontier_candidates(rows)}
    # b: within the noise of a (cheaper) -> kept; c: clearly beaten by a; e: fewer passkeys than d -> kept;
    # f: another policy, not compared with mikv; g: above SCREEN_MAX_BYTES; h: PPL above SCREEN_MAX_PPL
    assert near == {"a", "b", "d", "e", "f"}
    from mikv_vllm.eval.report import headline_rows
    # the best of each family within 20 % of a 16-bit cache (51.2 B) and within uniform INT4's 80 B:
    # h (the only mikv row <= 51 B, PPL 1.3 or not), d (most passkeys, then lowest PPL <= 80 B), f
    assert [r["label"] for r in headline_rows(rows, 64)] == ["h", "d", "f"]
    suite = F.frontier_configs_from_screen(rows, 64, 128, headline=headline_rows(rows, 64))
    labels = [c.label for c in suite]
    assert {"a", "b", "d", "e", "f", "h", "rtn-int4-g32", "rtn-int4-g64-rot", "h2o-r0.2-fp8"} <= set(labels)
    assert "h" not in {c.label for c in F.frontier_configs_from_screen(rows, 64, 128)}
    from mikv_vllm.config import preset
    assert C.EvalConfig.from_mikv(preset("mikv")).key() in {c.key() for c in suite}   # (b is the shipped preset)
    sizes = [C.bytes_of(c.config(), 64, 128) for c in suite]
    assert sizes == sorted(sizes) and len(labels) == len(set(labels))


def test_tuned_yaml_loads_as_the_same_config(tmp_path):
    from mikv_vllm.config import MiKVConfig
    from mikv_vllm.eval.configs import mikv_config
    from mikv_vllm.eval.report import to_yaml

    config = mikv_config(3, 0.1)
    path = tmp_path / "tuned.yaml"
    path.write_text(to_yaml(config.to_dict(), name="tuned-30"))
    assert MiKVConfig.from_yaml(path) == config.replace(name="tuned-30")


def test_screen_grid_covers_every_page_format_axis():
    import itertools

    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.eval import configs as C
    from mikv_vllm.eval.cli import SCREEN_WORKLOAD, suite_configs
    from mikv_vllm.eval.workload import Workload

    cfgs = suite_configs("screen", 64, 128)
    assert cfgs[0].policy == "stock" and len({c.key() for c in cfgs}) == len(cfgs)
    got = [(c.policy, (c.mikv["k_bits"], c.mikv["v_bits"]), c.mikv["hi_ratio"], c.mikv["group_size"],
            c.mikv["hi_dtype"], c.mikv["rotation"], c.mikv["balancer"], c.mikv["group_meta"]) for c in cfgs[1:]]
    mikv = {("mikv", (b, b), r, g, dt, rot, bal, "fp16") for b, r, g, dt, rot, bal in itertools.product(
        (2, 3, 4), (0.05, 0.1), (32, 64), ("float16", "float8_e4m3fn"), (False, True), (True, False))
        if bal or rot}                                                     # balancer off only when rotated
    kv = [(2, 2), (3, 3), (4, 4), (4, 3), (4, 2)]                          # keys and values apart (issue 26)
    mikv |= {("mikv", b, 0.03, 64, "float8_e4m3fn", rot, bal, "fp16")       # the lean small-r rows
             for b, rot, bal in itertools.product(kv, (False, True), (True, False)) if bal or rot}
    mikv |= {("mikv", b, 0.03, 64, "float8_e4m3fn", rot, bal, "fp8-scale")  # split rows: 3-byte group metadata
             for b, rot, bal in itertools.product(kv[3:], (False, True), (True, False)) if bal or rot}
    rtn = {("rtn", (b, b), 0.0, g, "float16", rot, False, "fp16")
           for b, g, rot in itertools.product((2, 3, 4), (32, 64), (False, True))}
    rtn |= {("rtn", b, 0.0, 64, "float16", rot, False, "fp16") for b, rot in itertools.product(kv[3:], (False, True))}
    h2o = {("h2o", (0, 0), r, None, dt, False, False, "fp16")
           for r in (0.2, 0.3, 0.4) for dt in ("float16", "float8_e4m3fn")}
    assert len(got) == len(set(got)) and set(got) == mikv | rtn | h2o
    sizes = [RegionLayout.build(c.config(), 128, 64).content_bytes for c in cfgs[1:]]
    assert sizes == sorted(sizes)                                          # cheapest first
    by_label = {c.label: c for c in cfgs}
    assert by_label["mikv-int3-r0.05-g64-fp8-rot"].family == "mikv INT3 g64-fp8-rot"
    assert by_label["mikv-int3-r0.05-g64-fp8-rot-nobal"].mikv["balancer"] is False
    assert by_label["rtn-int4-g64-rot"].mikv["balancer"] is False          # the paper's RTN
    # head_dim 96: no Hadamard rotation (not a power of two), no group 64 (does not divide 96)
    odd = C.screen_configs(96, 128)
    assert odd and not any(c.mikv["rotation"] or c.mikv["group_size"] == 64 for c in odd)
    w = Workload(**SCREEN_WORKLOAD)
    assert w.ppl_chunk == 16 and w.needle_trials == 0 and w.agree_prompts == 0


def test_split_width_configs_names_families_and_bytes():
    """Issue 26's candidates in the screen and the frontier, named k4v3-style, with bytes per token per KV
    head worked by hand at head_dim 64, block 128: K codes 32 B, V codes 24 (INT3) or 16 (INT2), one fp16
    (scale, zero) = 4 B each; mikv r 0.03: 4 fp8 slots x 2 x 64 B / 128 = 4, tags + scores (16 + 16) / 128,
    balancer 128 / 128, rounded up to whole bytes."""
    from mikv_vllm.eval import configs as C
    from mikv_vllm.eval import frontier as F

    screen = {c.label: c for c in C.screen_configs(64, 128)}
    want = {"rtn-k4v3-g64-rot": 64, "rtn-k4v2-g64-rot": 56, "rtn-k4v3-g64": 64,
            "mikv-k4v3-r0.03-g64-fp8": 70, "mikv-k4v3-r0.03-g64-fp8-rot-nobal": 69,
            "mikv-k4v2-r0.03-g64-fp8": 62, "mikv-k4v2-r0.03-g64-fp8-rot-nobal": 61,
            "mikv-k4v3-r0.03-g64-fp8-fp8scale": 68, "mikv-k4v2-r0.03-g64-fp8-fp8scale-rot-nobal": 59}
    assert {label: C.bytes_of(screen[label].config(), 64, 128) for label in want} == want
    cfg = screen["mikv-k4v3-r0.03-g64-fp8"]
    assert (cfg.mikv["k_bits"], cfg.mikv["v_bits"], cfg.family) == (4, 3, "mikv K4/V3 g64-fp8")
    assert cfg.config() == preset_mikv_with(v_bits=3, name=cfg.label)     # mikv-int4-r03's values at 3 bits
    assert C.cache_cost(cfg, 64, 128).bytes_per_token == 70
    frontier = {c.label: c for c in F.frontier_configs_from_screen([], 64, 128)}
    assert {"rtn-k4v3-g64-rot", "rtn-k4v2-g64-rot"} <= set(frontier)
    assert "rtn-k4v3-g64-rot" not in {c.label for c in F.frontier_configs_from_screen([], 96, 16)}   # no rotation


def preset_mikv_with(**changes):
    from mikv_vllm.config import preset

    return preset("mikv-int4-r03").replace(**changes)


def test_tune_searches_keys_and_values_apart():
    from mikv_vllm.eval import configs as C
    from mikv_vllm.eval.cli import tune_candidates

    cands = tune_candidates(0.27, 64, 128)                                 # 69 B of 256
    split = {(c.mikv["k_bits"], c.mikv["v_bits"]) for c in cands}
    assert {(4, 3), (4, 2)} <= split
    assert all(C.bytes_of(c.config(), 64, 128) <= 0.27 * 256 for c in cands)
    k4v3 = next(c for c in cands if c.policy == "mikv" and (c.mikv["k_bits"], c.mikv["v_bits"]) == (4, 3))
    assert k4v3.family == "mikv K4/V3" and k4v3.label.startswith("mikv-k4v3-r")


def test_results_stored_before_k_and_v_bits_stay_cached():
    """A stored result written with ``lo_bits`` (before k_bits / v_bits) is the same engine."""
    from mikv_vllm.config import preset
    from mikv_vllm.eval.configs import EvalConfig

    now = EvalConfig.from_mikv(preset("mikv-int4-r03"))
    stored = {k: v for k, v in now.mikv.items() if k not in ("k_bits", "v_bits")} | {"lo_bits": 4}
    old = EvalConfig.from_dict({**now.to_dict(), "mikv": stored})
    assert old.key() == now.key() and old.config() == now.config()
    assert EvalConfig.from_mikv(preset("mikv-int4-r03").replace(v_bits=3)).key() != now.key()


def test_results_stored_before_a_new_config_field_stay_cached():
    from mikv_vllm.config import preset
    from mikv_vllm.eval.configs import EvalConfig

    now = EvalConfig.from_mikv(preset("mikv-int4-r03"))
    old = EvalConfig.from_dict({**now.to_dict(), "mikv": {k: v for k, v in now.mikv.items() if k != "rotation"}})
    assert "rotation" not in old.mikv and old.key() == now.key()
    assert EvalConfig.from_mikv(preset("mikv-int4-r03").replace(rotation=True)).key() != now.key()


def test_default_pick_needs_a_config_that_runs_on_any_head_dim():
    """A rotated config is the default only when its unrotated fallback (what a model whose head_dim is not a
    power of two serves) passes the bar too; a cheaper rotated config whose fallback was not measured or
    fails is named, not picked."""
    from mikv_vllm.eval.configs import mikv_config
    from mikv_vllm.eval.report import pick_default, render_markdown, summarize

    lean = dict(group_size=64, hi_dtype="float8_e4m3fn")
    results = [
        _fake_result("stock", "stock", None, 10, 200.0),
        _fake_result("int4-rot", "mikv", mikv_config(4, 0.03, rotation=True, balancer=False, **lean).to_dict(), 10, 200.5),
        _fake_result("int4-lean", "mikv", mikv_config(4, 0.03, **lean).to_dict(), 10, 200.5),
    ]
    s = summarize(results)
    pick = pick_default(s)
    flags = {r["label"]: (r["passes_bar"], r["any_head_dim"], r["passes"]) for r in pick["candidates"]}
    assert flags == {"int4-rot": (True, False, False), "int4-lean": (True, True, True)}
    assert pick["chosen"]["label"] == "int4-lean" and pick["rotated"]["label"] == "int4-rot"
    assert "Fewer bytes pass with the rotation: `int4-rot`" in render_markdown(s, {"head_dim": 64}, pick)
    # K4/V3 rotated (balancer on) at 70 B: picked over the 78 B config while its unrotated fallback passes
    k4v3 = dict(v_bits=3, **lean)
    rot = _fake_result("k4v3-rot", "mikv", mikv_config(4, 0.03, rotation=True, **k4v3).to_dict(), 10, 201.0)
    for fallback_nll, chosen in ((202.0, "k4v3-rot"), (204.0, "int4-lean")):
        plain = _fake_result("k4v3", "mikv", mikv_config(4, 0.03, **k4v3).to_dict(), 10, fallback_nll)
        pick = pick_default(summarize([*results, rot, plain]))
        assert pick["chosen"]["label"] == chosen, fallback_nll


def test_compact_table_sums_retrieval_from_the_committed_frontier():
    from mikv_vllm.eval.report import compact_table

    doc = json.loads((Path(__file__).parent.parent / "docs/results/frontier/summary.json").read_text())
    rows = {r["label"]: r for r in doc["summary"]["rows"]}
    table = compact_table([rows["mikv-paper"]]).splitlines()
    assert len(table) == 3
    # passkey 17 + 19 + 18 of 3 x 20 (in-reach lengths), needle 4 3 3 4 4 of 5 x 4, PPL ratios as recorded
    assert table[2] == "| mikv-paper | 103 | 40.2 | 54/60 | 18/20 | 1.180 | 1.208 |"
