"""vLLM endpoint plugin (``vllm.endpoint_plugins``: ``mikv``): ``GET /mikv/stats`` and ``mikv_*`` metrics.

Loaded only when ``VLLM_PLUGINS`` names ``mikv`` (vLLM's rule for endpoint
plugins). The engine side is :class:`~mikv_vllm.vllm_glue.worker_ext.MiKVWorkerExtension`
(added by the general plugin when a MiKV policy is active); this module only
calls it through ``engine_client.collective_rpc("mikv_stats")``.

* ``GET /mikv/stats``: one RPC per request; ``{"enabled": false}`` (200) when no
  MiKV policy is active. Schema: docs/metrics.md.
* Prometheus: ``init_state`` starts an asyncio task that polls the same RPC
  every ``MIKV_STATS_INTERVAL`` seconds (default 5); :class:`MiKVCollector`, a
  custom collector in ``prometheus_client``'s default registry (the one vLLM's
  ``/metrics`` serves with a single API server), exports the last result as the
  ``mikv_*`` series. With several API servers (``PROMETHEUS_MULTIPROC_DIR``)
  prometheus_client serves no custom collectors: there is then no poller and a
  warning says so; ``/mikv/stats`` works in every API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import envs

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger

INTERVAL_ENV = envs.STATS_INTERVAL
DEFAULT_INTERVAL = envs.DEFAULT_STATS_INTERVAL
RPC_TIMEOUT = 30.0
STATE_KEY = "mikv_stats"

# Hi-tier pair counters: summed over the workers that hold distinct KV heads (one copy of each
# replicated head), over every pipeline stage.
_PAIRS = ("promoted", "demoted", "hi_tokens", "seen_tokens")
# Fields identical on every worker (same tokens, same config): taken from the first.
_SHARED = ("policy", "preset", "config", "head_dim", "block_size", "hi_slots_per_block",
           "bytes_per_token_per_head", "dense_bytes_per_token_per_head", "capacity_ratio",
           "bits_per_element", "breakdown")
# Token counters: every worker sees every token; max guards against a lagging worker.
_TOKENS = ("steps", "tokens_stored", "prefill_tokens", "decode_tokens")


def poll_interval() -> float:
    try:
        value = envs.stats_interval()
    except ValueError as exc:
        logger.warning("MiKV: %s; using %.0f s", exc, DEFAULT_INTERVAL)
        return DEFAULT_INTERVAL
    if value is None:
        return DEFAULT_INTERVAL
    return max(0.1, value)


# ------------------------------------------------------------------ aggregate
def aggregate(workers: list[Any]) -> dict[str, Any]:
    """The /mikv/stats body from the per-worker dicts of ``collective_rpc("mikv_stats")``.

    Workers are placed by ``tp_rank`` / ``pp_rank`` / ``kv_head_replicas`` (defaults:
    list position, stage 0, 1). Tensor-parallel ranks hold different KV heads of the
    same layers: heads and pair counters add up, layer counts do not. Pipeline stages
    hold different layers: layer counts add up. A replicated KV head counts once
    (the copy on the lowest TP rank).
    """
    workers = [w for w in workers if isinstance(w, dict)]
    live = [w for w in workers if w.get("enabled")]
    if not live:
        return {"enabled": False}
    first = live[0]
    out: dict[str, Any] = {"enabled": True, "num_workers": len(live)}
    for key in _SHARED:
        if key in first:
            out[key] = first[key]
    for key in _TOKENS:
        out[key] = max(int(w.get(key, 0)) for w in live)
    stages: dict[int, list[dict]] = {}
    for w in live:
        stages.setdefault(int(w.get("pp_rank", 0)), []).append(w)
    replicas = max(int(w.get("kv_head_replicas", 1)) for w in live)
    primary = [w for i, w in enumerate(live) if int(w.get("tp_rank", i)) % replicas == 0]
    for key in _PAIRS:
        out[key] = sum(int(w.get(key, 0)) for w in primary)
    first_stage = {id(w) for w in stages[min(stages)]}
    out["num_kv_heads"] = sum(int(w.get("num_kv_heads", 0)) for w in primary if id(w) in first_stage)
    out["num_layers"] = sum(max(int(w.get("num_layers", 0)) for w in ws) for ws in stages.values())
    out["sampled_layers"] = sum(max(int(w.get("sampled_layers", 0)) for w in ws) for ws in stages.values())
    out["tensor_parallel_size"] = max(int(w.get("tp_size", 1)) for w in live)
    out["pipeline_parallel_size"] = max(int(w.get("pp_size", 1)) for w in live)
    out["kv_head_replicas"] = replicas
    out["hi_occupancy"] = out["hi_tokens"] / out["seen_tokens"] if out["seen_tokens"] else 0.0
    if all("capacity_tokens" in w for w in live):
        out["num_blocks"] = min(int(w["num_blocks"]) for w in live)
        out["capacity_tokens"] = min(int(w["capacity_tokens"]) for w in live)
    out["workers"] = workers
    return out


async def fetch_stats(engine_client: Any) -> dict[str, Any]:
    if engine_client is None:
        return {"enabled": False}
    workers = await engine_client.collective_rpc("mikv_stats", timeout=RPC_TIMEOUT)
    return aggregate(list(workers or []))


def policy_active(engine_client: Any) -> bool:
    """Whether the engine was configured with a MiKV policy (no RPC needed)."""
    from ..config import MiKVConfig

    vllm_config = getattr(engine_client, "vllm_config", None)
    try:
        return MiKVConfig.from_additional_config(getattr(vllm_config, "additional_config", None)) is not None
    except Exception:
        return False


# ----------------------------------------------------------------- prometheus
# (series, type, /mikv/stats field, help); a counter's sample is named <series>_total
SERIES = (
    ("mikv_hi_occupancy_ratio", "gauge", "hi_occupancy", "Hi-tier (token, KV head) pairs / all (token, KV head) "
     "pairs of the requests in the last engine step (sampled layers)"),
    ("mikv_hi_tokens", "gauge", "hi_tokens", "Hi-tier (token, KV head) pairs of the last step's requests "
     "(sampled layers)"),
    ("mikv_seen_tokens", "gauge", "seen_tokens", "(token, KV head) pairs of the last step's requests "
     "(sampled layers)"),
    ("mikv_tokens_stored", "counter", "tokens_stored", "Tokens written to the MiKV cache"),
    ("mikv_prefill_tokens", "counter", "prefill_tokens", "Tokens written in multi-token (prefill) chunks"),
    ("mikv_decode_tokens", "counter", "decode_tokens", "Tokens written in single-token (decode) steps"),
    ("mikv_tokens_demoted", "counter", "demoted", "(token, KV head) pairs that left the hi tier (sampled layers)"),
    ("mikv_tokens_promoted", "counter", "promoted", "(token, KV head) pairs that entered the hi tier "
     "(sampled layers)"),
    ("mikv_bits_per_element", "gauge", "bits_per_element", "Cache bits per K/V element "
     "(all MiKV bytes / (2 * head_dim))"),
    ("mikv_bytes_per_token_per_head", "gauge", "bytes_per_token_per_head",
     "Cache bytes per token per KV head per layer"),
    ("mikv_capacity_ratio", "gauge", "capacity_ratio",
     "Dense (model dtype) bytes / MiKV bytes per token: cache capacity gain"),
    ("mikv_capacity_tokens", "gauge", "capacity_tokens", "Tokens the allocated KV cache can hold"),
    ("mikv_sampled_layers", "gauge", "sampled_layers", "Attention layers the hi-tier counters are measured on"),
)
INFO_LABELS = ("policy", "preset", "lo_bits", "k_bits", "v_bits", "hi_ratio")


def _bits_labels(config: dict[str, Any]) -> list[str]:
    """(lo_bits, k_bits, v_bits) labels: lo_bits is the common width ("" when keys and values differ);
    a config written with lo_bits only gives it to both."""
    lo = config.get("lo_bits")
    k, v = config.get("k_bits", lo), config.get("v_bits", lo)
    common = k if k == v else None
    return ["" if x is None else str(x) for x in (common, k, v)]


class MiKVCollector(Collector):
    """prometheus_client custom collector: the ``mikv_*`` series from the last polled ``/mikv/stats``.

    The counters are the workers' totals since engine start, reported as they are. Nothing is
    exported before the first poll with a MiKV policy active.
    """

    def __init__(self) -> None:
        self.stats: dict[str, Any] | None = None

    def update(self, stats: dict[str, Any]) -> None:
        if stats.get("enabled"):
            self.stats = stats

    def _families(self, stats: dict[str, Any] | None):
        for name, kind, key, doc in SERIES:
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            if stats is None:
                yield family(name, doc)
            elif key in stats:
                yield family(name, doc, value=float(stats[key]))
        info = GaugeMetricFamily("mikv_policy_info", "Active MiKV policy (value 1)", labels=INFO_LABELS)
        if stats is not None:
            config = stats.get("config") or {}
            info.add_metric([str(stats.get("policy", "")), str(stats.get("preset", "")),
                             *_bits_labels(config), str(config.get("hi_ratio", ""))], 1)
        yield info

    def describe(self):
        return list(self._families(None))

    def collect(self):
        stats = self.stats
        return self._families(stats) if stats is not None else iter(())


_COLLECTOR: MiKVCollector | None = None


def metrics() -> MiKVCollector:
    """The process's collector, registered once in prometheus_client's default registry."""
    global _COLLECTOR
    if _COLLECTOR is None:
        from prometheus_client import REGISTRY

        collector = MiKVCollector()
        REGISTRY.register(collector)
        _COLLECTOR = collector
    return _COLLECTOR


async def poll_loop(engine_client: Any, interval: float, sink: MiKVCollector, state: Any = None) -> None:
    """Refresh ``sink`` from the workers every ``interval`` s until cancelled; never raises."""
    failures = 0
    last_log = 0.0
    while True:
        try:
            stats = await fetch_stats(engine_client)
            sink.update(stats)
            if state is not None:
                state.last = stats
                state.last_time = time.time()
            if failures:
                logger.info("MiKV stats polling recovered after %d failed attempt(s)", failures)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # engine busy, dead or restarting: log (rate-limited), keep going
            failures += 1
            now = time.monotonic()
            if failures == 1 or now - last_log > 60:
                last_log = now
                logger.warning("MiKV stats polling failed (%d in a row): %r", failures, exc)
        await asyncio.sleep(interval)


class _PluginState:
    """Per-app state kept on ``app.state.mikv_stats``."""

    def __init__(self, engine_client: Any, enabled: bool):
        self.engine_client = engine_client
        self.enabled = enabled
        self.task: asyncio.Task | None = None
        self.last: dict[str, Any] | None = None
        self.last_time: float | None = None

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            logger.info("MiKV: stats polling stopped")


# --------------------------------------------------------------------- plugin
class MiKVEndpointPlugin:
    """Factory target of the ``vllm.endpoint_plugins`` entry point ``mikv``."""

    name = "mikv"
    required_tasks = ("generate",)

    def attach_router(self, app) -> None:
        router = APIRouter()

        @router.get("/mikv/stats")
        async def mikv_stats(request: Request):
            plugin_state: _PluginState | None = getattr(request.app.state, STATE_KEY, None)
            engine_client = getattr(request.app.state, "engine_client", None)
            if plugin_state is not None:
                engine_client = plugin_state.engine_client
                if not plugin_state.enabled:
                    return JSONResponse({"enabled": False})
            if engine_client is None:
                return JSONResponse({"enabled": False})
            try:
                stats = await fetch_stats(engine_client)
            except Exception as exc:
                logger.warning("MiKV /mikv/stats: collective_rpc failed: %r", exc)
                return JSONResponse({"enabled": True, "error": f"collective_rpc failed: {exc!r}"},
                                    status_code=503)
            return JSONResponse(stats)

        app.include_router(router)
        _chain_shutdown(app)

    async def init_state(self, engine_client, state, args) -> None:
        enabled = engine_client is not None and policy_active(engine_client)
        plugin_state = _PluginState(engine_client, enabled)
        old = getattr(state, STATE_KEY, None)
        if isinstance(old, _PluginState):
            await old.stop()
        setattr(state, STATE_KEY, plugin_state)
        if not enabled:
            return
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") is not None:
            logger.warning("MiKV: several API servers (PROMETHEUS_MULTIPROC_DIR): prometheus_client's multiprocess "
                           "mode serves no custom collectors, so /metrics has no mikv_* series; "
                           "GET /mikv/stats has the same numbers")
            return
        interval = poll_interval()
        try:
            sink = metrics()
        except Exception:
            logger.exception("MiKV: could not register the mikv_* Prometheus metrics; /metrics will lack them")
            return
        plugin_state.task = asyncio.get_running_loop().create_task(
            poll_loop(engine_client, interval, sink, plugin_state), name="mikv-stats-poll")
        logger.info("MiKV: /mikv/stats enabled; mikv_* metrics refreshed every %.1f s", interval)


def _chain_shutdown(app) -> None:
    """Cancel the polling task when the app's lifespan ends (vLLM has no plugin shutdown hook)."""
    router = app.router
    if getattr(router, "_mikv_lifespan_wrapped", False):
        return
    original = router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a):
        async with original(a) as value:
            try:
                yield value
            finally:
                plugin_state = getattr(getattr(a, "state", None), STATE_KEY, None)
                if isinstance(plugin_state, _PluginState):
                    await plugin_state.stop()

    router.lifespan_context = lifespan
    router._mikv_lifespan_wrapped = True
