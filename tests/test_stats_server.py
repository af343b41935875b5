"""Live MiKV stats: worker counters, ``GET /mikv/stats`` and the ``mikv_*`` Prometheus series.

The first tests are in-process (no engine): the per-step tag accounting of
:class:`~mikv_vllm.vllm_glue.stats.LayerStats` against a brute-force diff of the
hi sets, the /mikv/stats aggregation and the collectors' re-registration. The
``engine`` tests share one ``vllm serve --kv-cache-policy mikv`` (module scope,
``VLLM_PLUGINS=mikv`` so the endpoint plugin loads, metrics polled every 1 s).
"""

from __future__ import annotations

import json
import math
import re
import time
import types
from pathlib import Path

import pytest
import torch

from mikv_vllm.config import preset
from mikv_vllm.core import reference
from mikv_vllm.core.layout import RegionLayout
from mikv_vllm.vllm_glue.stats import LayerStats, step_token_counts

POLL_INTERVAL_S = 1.0
METRICS_TIMEOUT_S = 60.0
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "mikv-vllm.json"
SERIES_RE = re.compile(r"\b(mikv_[a-z0-9_]+|vllm:[a-z0-9_:]+)")
# what the dashboard shows of vLLM's own series: KV usage, throughput, TTFT / TPOT, preemptions, prefix hits
VLLM_SERIES = {"vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
               "vllm:time_to_first_token_seconds_bucket", "vllm:request_time_per_output_token_seconds_bucket",
               "vllm:num_preemptions_total", "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"}


# ----------------------------------------------------------------- in-process
def _hi_set(regions, layout, row, length):
    """{(kv head, position + 1)} of a request with ``length`` tokens, from its tags."""
    if length == 0:
        return set()
    nb = -(-length // layout.block_size)
    tags = layout.views(regions).tag[row[:nb].long()]
    return {(h, int(x)) for b in range(nb) for h in range(tags.shape[1]) for x in tags[b, h] if 0 < x <= length}


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs CUDA")]),
])
def test_layer_stats_match_hi_set_diff(device):
    torch.manual_seed(0)
    config = preset("mikv-paper")   # r = 0.2: budgets large enough to demote in 80 tokens
    n, h, hq, d = 16, 2, 4, 64
    layout = RegionLayout.build(config, n, d)
    # reused blocks are never zeroed: start from garbage so stale tags are exercised
    regions = torch.randint(0, 256, (64, h, layout.region_bytes), dtype=torch.uint8, device=device)
    rows = torch.tensor([[5, 9, 2, 40, 41, 42, 0, 0], [7, 3, 11, 12, 13, 14, 0, 0]], dtype=torch.int32,
                        device=device)
    stats = LayerStats(sampled=True)
    lens = [0, 0]
    promoted = demoted = 0
    # chunked prefill, a step where request 1 is absent, then decode past block boundaries
    plan = [[37, 20], [1, 1], [1, 0], [15, 1]] + [[1, 1]] * 30
    for chunk in plan:
        qsl, seq = [0], []
        for i, t in enumerate(chunk):
            qsl.append(qsl[-1] + t)
            seq.append(lens[i] + t)
        meta = types.SimpleNamespace(query_start_loc=qsl, seq_lens=seq, block_table=rows, own_from=None,
                                     token_counts=step_token_counts(torch.tensor(chunk)))
        before = [_hi_set(regions, layout, rows[i], lens[i]) for i in range(2)]
        probe = stats.begin_step(None, regions, layout, meta)
        for i, t in enumerate(chunk):
            if t:
                q, k, v = (torch.randn(t, hh, d, device=device) for hh in (hq, h, h))
                reference.forward_request(regions, layout, config, rows[i], lens[i], q, k, v, d ** -0.5)
        stats.end_step(probe, regions, layout, meta)
        hi_now = seen = 0
        for i, t in enumerate(chunk):
            after = _hi_set(regions, layout, rows[i], seq[i])
            promoted += len(after - before[i])
            demoted += len(before[i] - after)
            if t:
                hi_now += len(after)
                seen += seq[i] * h
        lens = seq
        snap = stats.snapshot()
        assert (snap["promoted"], snap["demoted"], snap["hi_tokens"], snap["seen_tokens"]) == (
            promoted, demoted, hi_now, seen)
    assert snap["tokens_stored"] == sum(lens) == snap["prefill_tokens"] + snap["decode_tokens"]
    assert snap["prefill_tokens"] == sum(t for chunk in plan for t in chunk if t > 1)
    assert demoted > 0 and 0 < snap["hi_tokens"] / snap["seen_tokens"] <= config.hi_ratio


def test_layer_stats_count_shared_prefix_blocks_once():
    """Prefix caching: a reader (own_from 2) counts the hi pairs of its own blocks only; the shared
    blocks' tags are the writer's (counted by the writer), so hi_tokens never double counts."""
    torch.manual_seed(1)
    config = preset("mikv-paper")
    n, h, hq, d = 16, 2, 4, 64
    layout = RegionLayout.build(config, n, d)
    regions = torch.zeros(16, h, layout.region_bytes, dtype=torch.uint8)
    rows = torch.tensor([[3, 8, 1, 12], [3, 8, 10, 4]], dtype=torch.int32)   # blocks 3, 8 shared
    q, k, v = (torch.randn(40, hh, d) for hh in (hq, h, h))
    reference.forward_request(regions, layout, config, rows[0], 0, q, k, v, d ** -0.5)   # the writer
    stats = LayerStats(sampled=True)
    meta = types.SimpleNamespace(query_start_loc=[0, 1, 11], seq_lens=[41, 42], block_table=rows, own_from=[0, 2],
                                 token_counts=step_token_counts(torch.tensor([1, 10])))
    probe = stats.begin_step(None, regions, layout, meta)
    q, k, v = (torch.randn(11, hh, d) for hh in (hq, h, h))
    reference.forward_request(regions, layout, config, rows[0], 40, q[:1], k[:1], v[:1], d ** -0.5)
    reference.forward_request(regions, layout, config, rows[1], 32, q[1:], k[1:], v[1:], d ** -0.5, own_from=2)
    stats.end_step(probe, regions, layout, meta)
    writer = _hi_set(regions, layout, rows[0], 41)
    reader_own = {(hh, int(x)) for b in rows[1, 2:3].long() for hh in range(h)
                  for x in layout.views(regions).tag[b, hh] if 0 < x <= 42}
    assert reader_own and stats.snapshot()["hi_tokens"] == len(writer) + len(reader_own)


def test_aggregate_sums_heads_and_keeps_shared_fields():
    from mikv_vllm.vllm_glue.endpoints import aggregate

    assert aggregate([]) == {"enabled": False}
    assert aggregate([{"enabled": False}]) == {"enabled": False}
    worker = {"enabled": True, "policy": "mikv", "preset": "mikv", "config": {"lo_bits": 2, "hi_ratio": 0.2},
              "num_kv_heads": 2, "tokens_stored": 10, "steps": 3, "promoted": 7, "demoted": 3,
              "hi_tokens": 4, "seen_tokens": 20, "sampled_layers": 1, "capacity_ratio": 4.0,
              "num_blocks": 100, "capacity_tokens": 1600}
    out = aggregate([worker, {**worker, "num_blocks": 90, "capacity_tokens": 1440, "hi_tokens": 2}])
    assert out["enabled"] and out["num_workers"] == 2 and len(out["workers"]) == 2
    assert (out["tokens_stored"], out["promoted"], out["demoted"], out["num_kv_heads"]) == (10, 14, 6, 4)
    assert out["hi_occupancy"] == pytest.approx(6 / 40)
    assert out["capacity_tokens"] == 1440 and out["capacity_ratio"] == 4.0


def _worker(tp_rank, tp_size=1, pp_rank=0, pp_size=1, replicas=1, heads=1, **counters):
    base = {"enabled": True, "policy": "mikv", "preset": "mikv", "num_layers": 10, "num_kv_heads": heads,
            "sampled_layers": 1, "tokens_stored": 50, "steps": 7, "promoted": 20, "demoted": 5,
            "hi_tokens": 10, "seen_tokens": 100, "num_blocks": 64, "capacity_tokens": 1024}
    return {**base, "rank": pp_rank * tp_size + tp_rank, "tp_rank": tp_rank, "tp_size": tp_size,
            "pp_rank": pp_rank, "pp_size": pp_size, "kv_head_replicas": replicas, **counters}


def test_aggregate_tensor_parallel_sums_heads_not_layers():
    from mikv_vllm.vllm_glue.endpoints import aggregate

    out = aggregate([_worker(r, tp_size=3, hi_tokens=10 + r) for r in range(3)])
    assert (out["num_workers"], out["tensor_parallel_size"], out["kv_head_replicas"]) == (3, 3, 1)
    assert (out["num_kv_heads"], out["num_layers"], out["sampled_layers"]) == (3, 10, 1)
    assert (out["promoted"], out["demoted"], out["hi_tokens"], out["seen_tokens"]) == (60, 15, 33, 300)
    assert out["tokens_stored"] == 50 and out["hi_occupancy"] == pytest.approx(33 / 300)


def test_aggregate_pipeline_stages_add_layers():
    from mikv_vllm.vllm_glue.endpoints import aggregate

    workers = [_worker(t, tp_size=2, pp_rank=p, pp_size=2, heads=2) for p in range(2) for t in range(2)]
    out = aggregate(workers)
    assert out["pipeline_parallel_size"] == 2 and out["num_workers"] == 4
    # 4 KV heads (2 per TP rank), 20 layers (10 per stage), one sampled layer per stage
    assert (out["num_kv_heads"], out["num_layers"], out["sampled_layers"]) == (4, 20, 2)
    assert out["seen_tokens"] == 400


def test_aggregate_replicated_kv_heads_count_once():
    from mikv_vllm.vllm_glue.endpoints import aggregate

    # 3 KV heads on TP = 6: ranks (0, 1) hold head 0, (2, 3) head 1, (4, 5) head 2
    workers = [_worker(r, tp_size=6, replicas=2, hi_tokens=10 + r // 2 + 100 * (r % 2)) for r in range(6)]
    out = aggregate(workers)
    assert out["num_kv_heads"] == 3 and out["kv_head_replicas"] == 2 and out["num_workers"] == 6
    assert (out["hi_tokens"], out["seen_tokens"]) == (33, 300)   # the copies on ranks 0, 2, 4


def test_collector_exports_the_last_stats():
    from prometheus_client import CollectorRegistry, generate_latest

    from mikv_vllm.vllm_glue import endpoints

    registry = CollectorRegistry(auto_describe=True)
    collector = endpoints.MiKVCollector()
    registry.register(collector)
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # describe() names every series
        registry.register(endpoints.MiKVCollector())
    assert "mikv_" not in generate_latest(registry).decode()  # nothing before the first poll
    stats = {"enabled": True, "policy": "mikv", "preset": "mikv", "config": {"lo_bits": 2, "hi_ratio": 0.2},
             "tokens_stored": 5, "promoted": 2, "demoted": 1, "hi_occupancy": 0.2, "capacity_ratio": 4.5}
    collector.update(stats)
    collector.update({**stats, "tokens_stored": 9, "config": {"lo_bits": 3, "hi_ratio": 0.1}})
    collector.update({"enabled": False})  # a poll without MiKV keeps the last values
    text = generate_latest(registry).decode()
    assert "mikv_tokens_stored_total 9.0" in text and "mikv_tokens_promoted_total 2.0" in text
    assert "# TYPE mikv_tokens_stored_total counter" in text and "# TYPE mikv_capacity_ratio gauge" in text
    assert "mikv_capacity_tokens" not in text  # absent from the stats: not exported
    assert text.count("mikv_policy_info{") == 1
    assert 'mikv_policy_info{hi_ratio="0.1",k_bits="3",lo_bits="3",policy="mikv",preset="mikv",v_bits="3"} 1.0' in text
    collector.update({**stats, "config": {"k_bits": 4, "v_bits": 3, "hi_ratio": 0.03}})
    text = generate_latest(registry).decode()
    assert 'mikv_policy_info{hi_ratio="0.03",k_bits="4",lo_bits="",policy="mikv",preset="mikv",v_bits="3"} 1.0' in text
    assert endpoints.metrics() is endpoints.metrics()  # registered once per process
    plugin = endpoints.MiKVEndpointPlugin()
    assert plugin.name == "mikv" and plugin.required_tasks == ("generate",)


def _dashboard_series() -> set[str]:
    """Every series the dashboard's queries (panels and template variables) name."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return {name for e in exprs for name in SERIES_RE.findall(e)}


def test_dashboard_layout_and_coverage():
    from mikv_vllm.vllm_glue.endpoints import SERIES

    dash = json.loads(DASHBOARD.read_text())
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dash["templating"]["list"]}
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        here = {(g["x"] + i, g["y"] + j) for i in range(g["w"]) for j in range(g["h"])}
        assert not here & cells, f"panel {p['title']!r} overlaps another"
        cells |= here
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and "datasource" in variables
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")") and t["expr"].count("{") == t["expr"].count("}")
            if SERIES_RE.search(t["expr"]):
                assert 'instance=~"$instance"' in t["expr"], t["expr"]
    named = _dashboard_series()
    served = {name + "_total" if kind == "counter" else name for name, kind, _, _ in SERIES} | {"mikv_policy_info"}
    assert served <= named, f"mikv series missing from the dashboard: {sorted(served - named)}"
    assert VLLM_SERIES <= named, sorted(VLLM_SERIES - named)


class _FakeEngine:
    """Just enough EngineClient for the plugin: vllm_config.additional_config + collective_rpc."""

    def __init__(self, additional_config, fail=False):
        self.vllm_config = types.SimpleNamespace(additional_config=additional_config)
        self.fail = fail
        self.calls = 0

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "mikv_stats"
        self.calls += 1
        if self.fail:
            raise RuntimeError("engine busy")
        return [{"enabled": True, "policy": "mikv", "preset": "mikv", "config": {"lo_bits": 2, "hi_ratio": 0.2},
                 "num_kv_heads": 3, "tokens_stored": 10 * self.calls, "hi_tokens": 3, "seen_tokens": 15,
                 "sampled_layers": 1}]


@pytest.mark.parametrize("policy", [True, False])
def test_plugin_routes_polling_and_shutdown(monkeypatch, policy):
    import contextlib

    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from mikv_vllm.vllm_glue import endpoints

    monkeypatch.setenv(endpoints.INTERVAL_ENV, "0.05")
    engine = _FakeEngine({"kv_cache_policy": "mikv"} if policy else {})

    @contextlib.asynccontextmanager
    async def lifespan(app):  # stands in for vLLM's own lifespan
        await endpoints.MiKVEndpointPlugin().init_state(engine, app.state, None)
        yield

    app = FastAPI(lifespan=lifespan)
    plugin = endpoints.MiKVEndpointPlugin()
    plugin.attach_router(app)
    plugin.attach_router(app)  # wrapping the lifespan twice is a no-op
    with TestClient(app) as client:
        body = client.get("/mikv/stats").json()
        state = app.state.mikv_stats
        if not policy:
            assert body == {"enabled": False} and state.task is None and engine.calls == 0
            return
        assert body["enabled"] and body["num_kv_heads"] == 3 and body["hi_occupancy"] == pytest.approx(0.2)
        task = state.task
        deadline = time.monotonic() + 10
        while state.last is None or engine.calls < 3:
            assert time.monotonic() < deadline, "poller did not run"
            time.sleep(0.05)
        engine.fail = True  # polling errors are logged, the task keeps running
        time.sleep(0.3)
        assert not task.done()
        assert client.get("/mikv/stats").status_code == 503
    assert task.cancelled() or task.done()  # stopped by the lifespan wrapper on shutdown
    assert state.task is None


# --------------------------------------------------------------------- server
@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    from helpers import ServerError, vllm_server

    # mikv-paper (r = 0.2): these short requests get hi budgets that demote (the default's r = 0.05 would not)
    args = ("--kv-cache-policy", "mikv", "--mikv-config", "mikv-paper", "--kv-cache-memory-bytes", str(512 << 20),
            "--max-model-len", "2048")
    env = {"VLLM_PLUGINS": "mikv", "MIKV_STATS_INTERVAL": str(POLL_INTERVAL_S)}
    try:
        with vllm_server(model_dir, *args, env=env, log_dir=tmp_path_factory.mktemp("vllm-stats")) as srv:
            yield srv
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


def _get_json(server, path):
    import json

    status, body = server.get(path)
    assert status == 200, f"GET {path}: {status} {body[:500]}\n{server.log_tail(30)}"
    return json.loads(body)


def _metrics(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of the mikv_* series in /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = server.get("/metrics")
    assert status == 200, f"/metrics: {status}"
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) if family.name.startswith("mikv_")
            for s in family.samples}


PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The sea is wide and",
    "List three prime numbers greater than one hundred, separated by commas:",
]


@pytest.fixture(scope="module")
def traffic(server):
    """Sequential completions (so the last engine step holds one request); their token usage."""
    client = server.openai_client()
    lengths = []
    for i, prompt in enumerate(PROMPTS):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=20 + 7 * i,
                                      temperature=0.0)
        # every token but the last generated one has been written to the cache
        lengths.append(r.usage.prompt_tokens + r.usage.completion_tokens - 1)
    return lengths


@pytest.mark.engine
def test_mikv_stats_endpoint(server, traffic):
    stats = _get_json(server, "/mikv/stats")
    assert stats["enabled"] is True and stats["policy"] == "mikv" and stats["preset"] == "mikv-paper"
    assert stats["num_workers"] == len(stats["workers"]) == 1
    r, heads = stats["config"]["hi_ratio"], stats["num_kv_heads"]
    assert stats["tokens_stored"] == sum(traffic) > 0
    assert stats["sampled_layers"] == 1
    # budget floor(r * L) is always filled; the last step held only the last request
    last = traffic[-1]
    assert stats["seen_tokens"] == heads * last
    assert stats["hi_tokens"] == heads * math.floor(r * last + 1e-9)
    assert 0 < stats["hi_occupancy"] <= r
    # one-way demotion: what entered minus what left = what each request held at its end
    assert stats["promoted"] - stats["demoted"] == heads * sum(math.floor(r * n + 1e-9) for n in traffic)
    assert stats["demoted"] > 0
    assert stats["capacity_ratio"] > 1 and stats["capacity_tokens"] > 0
    assert stats["bits_per_element"] < 16 and stats["bytes_per_token_per_head"] > 0


@pytest.mark.engine
def test_prometheus_series_follow_stats(server, traffic):
    stats = _get_json(server, "/mikv/stats")  # no traffic after `traffic`: values are final
    expected = {
        ("mikv_tokens_stored_total", ()): stats["tokens_stored"],
        ("mikv_tokens_demoted_total", ()): stats["demoted"],
        ("mikv_tokens_promoted_total", ()): stats["promoted"],
        ("mikv_hi_occupancy_ratio", ()): stats["hi_occupancy"],
        ("mikv_bits_per_element", ()): stats["bits_per_element"],
        ("mikv_bytes_per_token_per_head", ()): stats["bytes_per_token_per_head"],
        ("mikv_capacity_ratio", ()): stats["capacity_ratio"],
        ("mikv_capacity_tokens", ()): stats["capacity_tokens"],
        ("mikv_policy_info", (("hi_ratio", str(stats["config"]["hi_ratio"])),
                              ("k_bits", str(stats["config"]["k_bits"])),
                              ("lo_bits", str(stats["config"]["k_bits"])),
                              ("policy", "mikv"), ("preset", "mikv-paper"),
                              ("v_bits", str(stats["config"]["v_bits"])))): 1.0,
    }
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    while True:  # the poller refreshes every POLL_INTERVAL_S
        got = _metrics(server)
        diff = {k: (v, got.get(k)) for k, v in expected.items()
                if got.get(k) is None or not math.isclose(got[k], v, rel_tol=1e-9, abs_tol=1e-12)}
        if not diff:
            break
        assert time.monotonic() < deadline, f"mikv_* series differ from /mikv/stats (want, got): {diff}"
        time.sleep(POLL_INTERVAL_S / 2)
    assert 0 < got[("mikv_hi_occupancy_ratio", ())] <= 1
    assert got[("mikv_tokens_stored_total", ())] > 0


@pytest.mark.engine
def test_dashboard_series_are_served(server, traffic):
    """Every series deploy/grafana/mikv-vllm.json queries is on this server's /metrics (mikv_* after a poll)."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = _dashboard_series()
    deadline = time.monotonic() + METRICS_TIMEOUT_S
    while True:
        status, body = server.get("/metrics")
        assert status == 200, f"/metrics: {status}"
        served = {s.name for family in text_string_to_metric_families(body) for s in family.samples}
        if wanted <= served:
            break
        assert time.monotonic() < deadline, f"the dashboard names series /metrics does not serve: {sorted(wanted - served)}"
        time.sleep(POLL_INTERVAL_S / 2)
