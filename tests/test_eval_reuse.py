"""``mikv-vllm eval --reuse``: rows of an earlier report join a new one instead of running again, only
when they measured the same thing, with their ratios taken against the new run's stock."""

from __future__ import annotations

import json
import math

import pytest

from mikv_vllm.errors import CLIError
from mikv_vllm.eval.configs import EvalConfig, bytes_of, mikv_config, rtn_config
from mikv_vllm.eval.report import pick_default, summarize
from mikv_vllm.eval.reuse import reuse_rows

MODEL = "/models/smollm2"
KV = 1 << 30
WORKLOAD = {"passkey_lengths": [1024], "ppl_chunk": 16}


def _result(cfg: EvalConfig, passkey_ok: int, nll: float, capacity: int = 1000) -> dict:
    return {"config": cfg.to_dict(),
            "engine": {"head_dim": 64, "block_size": 128, "capacity_tokens": capacity, "dtype": "float32",
                       "mikv_stats": None if cfg.is_stock else {"bytes_per_token_per_head": bytes_of(cfg.config(), 64, 128)}},
            "timings": {"total": 1.0, "engine_start": 1.0},
            "probes": {"passkey": [{"id": f"p{i}", "cell": "1024", "correct": i < passkey_ok} for i in range(10)],
                       "ppl": [{"nll": nll, "tokens": 100}]}}


def _report(tmp_path, results, workload=WORKLOAD, model=MODEL, kv=KV, name="old.json"):
    meta = {"workload": workload, "model": model, "kv_cache_memory_bytes": kv, "head_dim": 64, "block_size": 128}
    path = tmp_path / name
    path.write_text(json.dumps({"meta": meta, "summary": summarize(results)}))
    return str(path)


STOCK = EvalConfig.stock()
INT3 = EvalConfig.from_mikv(mikv_config(3, 0.05))
K4V3 = EvalConfig.from_mikv(mikv_config(4, 0.03, v_bits=3))
RTN = EvalConfig.from_mikv(rtn_config(4))


def test_measured_configs_are_carried_and_the_rest_run(tmp_path):
    old = _report(tmp_path, [_result(STOCK, 10, 200.0), _result(INT3, 9, 202.0, 5000), _result(RTN, 10, 201.0)])
    renamed = EvalConfig.from_mikv(mikv_config(3, 0.05).replace(name="int3-again"), groups=("frontier",))
    run, carried = reuse_rows([old], [STOCK, renamed, K4V3], WORKLOAD, MODEL, KV)
    assert [c.label for c in run] == ["stock", K4V3.label]          # stock always runs; K4V3 was not measured
    assert [r["label"] for r in carried] == ["int3-again"]          # relabelled as this run names it
    assert carried[0]["groups"] == ["frontier"] and carried[0]["reused_from"] == old


@pytest.mark.parametrize("what", ["workload", "model", "kv"])
def test_a_report_of_another_measurement_is_refused(tmp_path, what):
    other = {"workload": {**WORKLOAD, "ppl_chunk": 128}, "model": "/models/other", "kv": KV // 2}[what]
    old = _report(tmp_path, [_result(STOCK, 10, 200.0), _result(INT3, 9, 202.0)], **{what: other})
    with pytest.raises(CLIError, match="another"):
        reuse_rows([old], [STOCK, INT3], WORKLOAD, MODEL, KV)


def test_a_row_of_another_page_layout_runs_again(tmp_path):
    old = _report(tmp_path, [_result(STOCK, 10, 200.0), _result(INT3, 9, 202.0)])
    doc = json.loads(open(old).read())
    doc["summary"]["rows"][1]["engine_bytes_per_token_per_head"] += 1       # the page format changed since
    open(old, "w").write(json.dumps(doc))
    run, carried = reuse_rows([old], [STOCK, INT3], WORKLOAD, MODEL, KV)
    assert carried == [] and [c.label for c in run] == ["stock", INT3.label]


def test_carried_rows_are_rebased_on_this_runs_stock_and_join_the_pick(tmp_path):
    old = _report(tmp_path, [_result(STOCK, 10, 220.0, 2000), _result(INT3, 10, 202.0, 6000)])
    _, carried = reuse_rows([old], [STOCK, INT3], WORKLOAD, MODEL, KV)
    s = summarize([_result(STOCK, 10, 200.0, 1000), _result(K4V3, 10, 210.0)], carried)
    rows = {r["label"]: r for r in s["rows"]}
    assert set(rows) == {"stock", INT3.label, K4V3.label}
    assert rows[INT3.label]["ppl_ratio"] == pytest.approx(math.exp((202.0 - 200.0) / 100))   # not 202 vs 220
    assert rows[INT3.label]["capacity_vs_stock"] == 6.0
    assert pick_default(s)["chosen"]["label"] == INT3.label           # 202/200 passes; K4V3 210/200 does not
