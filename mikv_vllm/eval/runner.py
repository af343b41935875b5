"""Run configs x workload: one fresh worker process (one engine) per config.

Results are cached per config under ``RESULTS/runs/<slug>.json`` together with
the workload digest and model path; a rerun with the same workload skips the
configs already measured (``--fresh`` ignores the cache), so a long sweep can be
resumed and the tuner reuses the sweep's numbers.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .configs import EvalConfig, bytes_of
from .workload import Workload

PROGRESS = "@@progress "
START_COST = 0.35  # an engine start, in workload cost units (see Workload.cost_units)


@dataclass
class EngineSettings:
    model: str
    kv_cache_memory_bytes: int = 1 << 30
    max_model_len: int = 4096
    dtype: str = "float32"
    seed: int = 0
    threads: int | None = None
    timeout_s: float = 4 * 3600


class WorkerError(RuntimeError):
    pass


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def _kill_live_workers(*_: object) -> None:
    """Kill the process groups of running workers (they run in their own sessions)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _install_cleanup() -> None:
    atexit.register(_kill_live_workers)
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            _kill_live_workers()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_term)


def _cached(path: Path, cfg: EvalConfig, workload: Workload, settings: EngineSettings) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            res = json.load(fh)
    except (OSError, ValueError):
        return None
    if res.get("workload_digest") != workload.digest() or res.get("model") != settings.model:
        return None
    if EvalConfig.from_dict(res["config"]).key() != cfg.key():
        return None
    if res.get("engine", {}).get("kv_cache_memory_bytes") != settings.kv_cache_memory_bytes:
        return None
    if not cfg.is_stock and _stored_page_bytes(res) != _page_bytes(cfg, res["engine"]):
        return None   # measured on another page layout: its capacity no longer holds
    return res


def _stored_page_bytes(res: dict) -> int | None:
    return ((res.get("engine") or {}).get("mikv_stats") or {}).get("bytes_per_token_per_head")


def _page_bytes(cfg: EvalConfig, engine: dict) -> int | None:
    try:
        return bytes_of(cfg.config(), int(engine["head_dim"]), int(engine["block_size"]))
    except (KeyError, TypeError, ValueError):
        return None


class Progress:
    """One tqdm bar over all configs (cost-weighted), thread-safe."""

    def __init__(self, total: float, enabled: bool, desc: str):
        self.enabled = enabled
        self.lock = threading.Lock()
        self.current: dict[str, str] = {}
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=round(total, 2), desc=desc, unit="u", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} [{elapsed}<{remaining}] {postfix}",
                            file=sys.stderr)

    def advance(self, amount: float, label: str | None = None, status: str | None = None) -> None:
        with self.lock:
            if label is not None:
                if status is None:
                    self.current.pop(label, None)
                else:
                    self.current[label] = status
            if self.bar is not None:
                amount = max(0.0, min(amount, self.bar.total - self.bar.n))
                self.bar.update(round(amount, 4))
                self.bar.set_postfix_str(" | ".join(f"{k}: {v}" for k, v in self.current.items())[:90])

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_one(cfg: EvalConfig, workload: Workload, settings: EngineSettings, out_dir: Path,
            progress: Progress | None = None) -> dict[str, Any]:
    """Run one config in a fresh worker process; return its result dict."""
    runs = out_dir / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    spec_path = runs / f"{cfg.slug()}.spec.json"
    result_path = runs / f"{cfg.slug()}.json"
    log_path = runs / f"{cfg.slug()}.log"
    spec = {"config": cfg.to_dict(), "workload": workload.to_dict(), "model": settings.model,
            "kv_cache_memory_bytes": settings.kv_cache_memory_bytes, "max_model_len": settings.max_model_len,
            "dtype": settings.dtype, "seed": settings.seed, "threads": settings.threads}
    spec_path.write_text(json.dumps(spec, indent=1))
    if result_path.exists():
        result_path.unlink()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "mikv_vllm.eval.worker", str(spec_path), str(result_path)]
    total = workload.cost_units()
    credited = 0.0
    started = False
    t0 = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        last_error = ""
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                log.write(line)
                if not line.startswith(PROGRESS):
                    continue
                try:
                    ev = json.loads(line[len(PROGRESS):])
                except ValueError:
                    continue
                kind = ev.get("event")
                if progress is None:
                    continue
                if kind == "starting":
                    progress.advance(0, cfg.label, "starting engine")
                elif kind == "started" and not started:
                    started = True
                    progress.advance(START_COST, cfg.label, f"engine up {ev.get('seconds', 0):.0f}s")
                elif kind == "request":
                    done = float(ev["done"]) / max(1e-9, float(ev["total"])) * total
                    progress.advance(done - credited, cfg.label, ev.get("probe", ""))
                    credited = done
                elif kind == "error":
                    last_error = ev.get("message", "")
                if time.time() - t0 > settings.timeout_s:
                    raise WorkerError(f"{cfg.label}: timed out after {settings.timeout_s:.0f} s")
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                _kill_live_workers()  # interrupted: no worker may outlive the benchmark
                proc.wait()
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    if progress is not None:
        progress.advance((0 if started else START_COST) + (total - credited), cfg.label, None)
    if rc != 0 or not result_path.exists():
        tail = "".join(open(log_path, encoding="utf-8", errors="replace").readlines()[-15:])
        raise WorkerError(f"{cfg.label}: worker exited with {rc} (log {log_path}){last_error}\n{tail}")
    with open(result_path, encoding="utf-8") as fh:
        return json.load(fh)


def run_configs(configs: Sequence[EvalConfig], workload: Workload, settings: EngineSettings, out_dir: Path, *,
                jobs: int = 1, fresh: bool = False, progress: bool = True, desc: str = "mikv eval",
                on_result: Callable[[dict], None] | None = None, keep_going: bool = True) -> list[dict]:
    """Run every config (cached ones skipped unless ``fresh``); results in config order."""
    out_dir = Path(out_dir)
    results: dict[str, dict] = {}
    todo: list[EvalConfig] = []
    for cfg in configs:
        cached = None if fresh else _cached(out_dir / "runs" / f"{cfg.slug()}.json", cfg, workload, settings)
        if cached is not None:
            cached["config"] = cfg.to_dict()  # groups/labels of this run
            cached["cached"] = True
            results[cfg.key()] = cached
        else:
            todo.append(cfg)
    _install_cleanup()
    total = len(todo) * (workload.cost_units() + START_COST)
    bar = Progress(total, progress, desc)
    if len(results):
        bar.write(f"[eval] {len(results)} config(s) reused from {out_dir / 'runs'} (same workload; --fresh reruns)")
    errors: list[str] = []
    lock = threading.Lock()
    if on_result is not None:
        for res in list(results.values()):
            on_result(res)

    def work(cfg: EvalConfig) -> None:
        try:
            res = run_one(cfg, workload, settings, out_dir, bar)
        except WorkerError as e:
            errors.append(str(e))
            bar.write(f"[eval] FAILED {e}")
            if not keep_going:
                raise
            return
        results[cfg.key()] = res
        t = res["timings"]
        bar.write(f"[eval] {cfg.label}: done in {t['total']:.0f} s (engine start {t['engine_start']:.0f} s)")
        if on_result is not None:
            with lock:
                on_result(res)

    try:
        if jobs <= 1:
            for cfg in todo:
                work(cfg)
        else:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(work, todo))
    finally:
        bar.close()
    if errors and not results:
        raise WorkerError("every config failed:\n" + "\n".join(errors))
    return [results[c.key()] for c in configs if c.key() in results]
