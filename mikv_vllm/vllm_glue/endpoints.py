"""vLLM endpoint plugin (``vllm.endpoint_plugins``: ``mikv``): ``GET /mikv/stats`` and ``mikv_*`` metrics.

Loaded only when ``VLLM_PLUGINS`` names ``mikv`` (vLLM's rule for endpoint
plugins). The engine side is :class:`~mikv_vllm.vllm_glue.worker_ext.MiKVWorkerExtension`
(added by the general plugin when a MiKV policy is active); this module only
calls it through ``engine_client.collective_rpc("mikv_stats")``.

* ``GET /mikv/stats``: one RPC per request; ``{"enabled": false}`` (200) when no
  MiKV policy is active. Schema: docs/metrics.md.
* Prometheus: ``init_state`` starts an asyncio task that polls the same RPC
  every ``MIKV_STATS_INTERVAL`` seconds (default 5) and updates ``mikv_*``
  collectors in ``prometheus_client``'s default registry, the one vLLM's
  ``/metrics`` serves with a single API server. With several API servers
  (``PROMETHEUS_MULTIPROC_DIR``) only API server rank 0 polls, so counters are
  not multiplied; gauges use ``multiprocess_mode="mostrecent"``.
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

logger = logging.getLogger("vllm.mikv")  # child of vLLM's configured logger

INTERVAL_ENV = "MIKV_STATS_INTERVAL"
DEFAULT_INTERVAL = 5.0
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
    raw = os.environ.get(INTERVAL_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_INTERVAL
    except ValueError:
        logger.warning("MiKV: %s=%r is not a number; using %.0f s", INTERVAL_ENV, raw, DEFAULT_INTERVAL)
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
class MiKVMetrics:
    """The ``mikv_*`` collectors (created once per process, reused on re-creation)."""

    def __init__(self, registry=None):
        import prometheus_client as pc

        self._pc = pc
        self.registry = registry if registry is not None else pc.REGISTRY
        gauge = self._gauge
        counter = self._counter
        self.hi_occupancy = gauge(
            "mikv_hi_occupancy_ratio",
            "Hi-tier (token, KV head) pairs / all (token, KV head) pairs of the requests in the last "
            "engine step (sampled layers)")
        self.hi_tokens = gauge("mikv_hi_tokens", "Hi-tier (token, KV head) pairs of the last step's requests "
                               "(sampled layers)")
        self.seen_tokens = gauge("mikv_seen_tokens", "(token, KV head) pairs of the last step's requests "
                                 "(sampled layers)")
        self.tokens_stored = counter("mikv_tokens_stored", "Tokens written to the MiKV cache")
        self.prefill_tokens = counter("mikv_prefill_tokens", "Tokens written in multi-token (prefill) chunks")
        self.decode_tokens = counter("mikv_decode_tokens", "Tokens written in single-token (decode) steps")
        self.demoted = counter("mikv_tokens_demoted", "(token, KV head) pairs that left the hi tier "
                               "(sampled layers)")
        self.promoted = counter("mikv_tokens_promoted", "(token, KV head) pairs that entered the hi tier "
                                "(sampled layers)")
        self.bits = gauge("mikv_bits_per_element", "Cache bits per K/V element (all MiKV bytes / (2 * head_dim))")
        self.bytes_per_token = gauge("mikv_bytes_per_token_per_head",
                                     "Cache bytes per token per KV head per layer")
        self.capacity_ratio = gauge("mikv_capacity_ratio",
                                    "Dense (model dtype) bytes / MiKV bytes per token: cache capacity gain")
        self.capacity_tokens = gauge("mikv_capacity_tokens", "Tokens the allocated KV cache can hold")
        self.sampled_layers = gauge("mikv_sampled_layers", "Attention layers the hi-tier counters are measured on")
        self.policy_info = gauge("mikv_policy_info", "Active MiKV policy (value 1)",
                                 ("policy", "preset", "lo_bits", "hi_ratio"))
        self._counter_values: dict[str, float] = {}
        self._info_labels: tuple[str, ...] | None = None

    # collectors are looked up by name first: the plugin may be built more than once per process
    def _existing(self, name: str):
        names = getattr(self.registry, "_names_to_collectors", {})
        return names.get(name)

    def _gauge(self, name: str, doc: str, labels: tuple[str, ...] = ()):
        found = self._existing(name)
        if found is not None:
            return found
        return self._pc.Gauge(name, doc, labels, registry=self.registry, multiprocess_mode="mostrecent")

    def _counter(self, name: str, doc: str):
        found = self._existing(name) or self._existing(name + "_total")
        if found is not None:
            return found
        return self._pc.Counter(name, doc, registry=self.registry)

    def _advance(self, key: str, counter, value: Any) -> None:
        """Counters mirror worker totals: add the growth since the last poll."""
        value = float(value or 0)
        last = self._counter_values.get(key)
        if last is None:  # first poll: take the counter to the worker total
            last = _counter_value(counter)
        if value > last:
            counter.inc(value - last)
        self._counter_values[key] = max(value, last)

    def update(self, stats: dict[str, Any]) -> None:
        if not stats.get("enabled"):
            return
        for key, counter in (("tokens_stored", self.tokens_stored), ("prefill_tokens", self.prefill_tokens),
                             ("decode_tokens", self.decode_tokens), ("demoted", self.demoted),
                             ("promoted", self.promoted)):
            self._advance(key, counter, stats.get(key))
        self.hi_occupancy.set(float(stats.get("hi_occupancy", 0.0)))
        self.hi_tokens.set(float(stats.get("hi_tokens", 0)))
        self.seen_tokens.set(float(stats.get("seen_tokens", 0)))
        self.sampled_layers.set(float(stats.get("sampled_layers", 0)))
        for key, gauge in (("bits_per_element", self.bits), ("bytes_per_token_per_head", self.bytes_per_token),
                           ("capacity_ratio", self.capacity_ratio), ("capacity_tokens", self.capacity_tokens)):
            if key in stats:
                gauge.set(float(stats[key]))
        config = stats.get("config") or {}
        labels = (str(stats.get("policy", "")), str(stats.get("preset", "")),
                  str(config.get("lo_bits", "")), str(config.get("hi_ratio", "")))
        if labels != self._info_labels:
            if self._info_labels is not None:
                with contextlib.suppress(KeyError):
                    self.policy_info.remove(*self._info_labels)
            self.policy_info.labels(*labels).set(1)
            self._info_labels = labels


def _counter_value(counter) -> float:
    try:
        return float(counter._value.get())
    except Exception:
        return 0.0


_METRICS: MiKVMetrics | None = None


def metrics() -> MiKVMetrics:
    global _METRICS
    if _METRICS is None:
        _METRICS = MiKVMetrics()
    return _METRICS


def _polls_prometheus(engine_client: Any) -> bool:
    """With several API servers (multiprocess metrics) only rank 0 updates the mikv_* series."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None:
        return True
    parallel = getattr(getattr(engine_client, "vllm_config", None), "parallel_config", None)
    return getattr(parallel, "_api_process_rank", 0) <= 0


async def poll_loop(engine_client: Any, interval: float, sink: MiKVMetrics, state: Any = None) -> None:
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
        if not enabled or not _polls_prometheus(engine_client):
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
