"""Bounded soak of a local MiKV server: load for --minutes, then checks (issue 28).

Starts ``vllm serve MODEL --kv-cache-policy mikv`` on loopback (or uses ``--url``, which must be a
loopback address) with a KV budget small enough that vLLM preempts (``--kv-cache-memory-bytes``;
``VLLM_CPU_KVCACHE_SPACE`` is removed from the server's environment, it would override the flag), and
keeps ``--concurrency`` clients busy until the time is up: token-id prompts of mixed lengths up to
``max_model_len`` (a share of them behind one of a few shared prefixes, so prefix caching hits),
streaming and non-streaming, greedy and seeded sampling, a share cancelled mid-stream (the client
closes the connection after a few chunks). Meanwhile it samples the RSS of every server process (the
API server and all its descendants: psutil, else /proc) and, every ``--probe-every`` seconds, sends a
fixed greedy probe that must answer exactly as at the start. The default config is lossless (r = 1:
every token stays hi, fp32 hi copies; the one ``tests/engine/test_robustness.py`` holds exact), so
batching, preemption, block reuse and cancellation must not change the probe by a single token.

Before the load it sweeps the step shapes (``--shape-sweep``: prompts of 1..N tokens, then long ones at
once), so that the worker's per-shape oneDNN primitive cache is full when the clock starts; without it
the worker's RSS climbs for 20-25 minutes of this load, in stock vLLM as in MiKV (docs/results.md).

After the load it drains (no request may stay running), probes once more, and reads preemptions and
prefix-cache hits from ``/metrics``. Writes ``summary.json``, ``summary.md`` and ``rss.csv`` to
``--out`` and exits 1 if a check failed: a failed request, a probe that changed, a request left running,
no preemption (the budget did not bite), RSS growth after warm-up above ``--max-rss-growth``.

    python benchmarks/soak.py --minutes 30 --concurrency 3 --out soak-30
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

LOSSLESS = '{"preset": "mikv", "hi_ratio": 1.0, "hi_dtype": "float32"}'
FILLER = ("The lighthouse keeper wrote in his log every evening: the wind, the colour of the sea, the ships "
          "that passed, the birds that rested on the rail, and the names of the stars he could see. ")


# ------------------------------------------------------------------------------------ server, metrics
def check_loopback(url: str) -> str:
    host = urllib.parse.urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise SystemExit(f"error: --url must be a loopback address, got {url!r}")
    return url.rstrip("/")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    policy = ["--kv-cache-policy", "mikv", "--mikv-config", args.mikv_config] if args.policy == "mikv" else []
    cmd = [sys.executable, "-m", "mikv_vllm.cli", "serve", args.model, "--host", "127.0.0.1", "--port", str(port),
           *policy, "--dtype", "float32", "--enforce-eager",
           "--seed", "0", "--max-model-len", str(args.max_model_len),
           "--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes), "--max-num-seqs", str(args.max_num_seqs),
           *args.server_arg]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               PYTHONUNBUFFERED="1", VLLM_PLUGINS=env.get("VLLM_PLUGINS", "mikv"))
    log = open(log_path, "wb")
    log.write(("$ " + " ".join(cmd) + "\n").encode())
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log_path}")
        try:
            http_get(url + "/health", 5)
            return proc, url
        except OSError:
            time.sleep(2)
    stop_server(proc)
    raise RuntimeError(f"vllm serve not healthy after {args.startup_timeout} s; log: {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # leftovers of the group (engine core)
    except (ProcessLookupError, PermissionError):
        pass


def http_get(url: str, timeout: float = 30) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode("utf-8", "replace")


def http_post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def metric(body: str, name: str) -> float:
    """Sum of every sample of a Prometheus series (all label sets)."""
    pat = re.compile(re.escape(name) + r"(\{[^}]*\})? ([0-9.eE+-]+|NaN)$")
    return sum(float(m.group(2)) for line in body.splitlines() if (m := pat.match(line)))


def server_pids(root_pid: int) -> list[int]:
    """The server process and all its descendants."""
    try:
        import psutil

        p = psutil.Process(root_pid)
        return [root_pid] + [c.pid for c in p.children(recursive=True)]
    except ImportError:
        pass
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_info(pid: int) -> dict:
    """Name of a server process (its title, e.g. ``VLLM::Worker``) and whether it runs on tcmalloc
    (the library mapped: mikv-vllm preloads it into the engine processes, MIKV_CPU_MALLOC)."""
    try:
        name = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:80]
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return {"name": "?", "tcmalloc": None}
    return {"name": name, "tcmalloc": "libtcmalloc" in maps}


# ------------------------------------------------------------------------------------------ workload
class Workload:
    """Token-id prompts: a few shared prefixes, mixed lengths up to max_model_len - max_tokens."""

    def __init__(self, corpus: list[int], max_model_len: int, seed: int, args):
        self.rng = random.Random(seed)
        self.corpus = corpus
        self.max_model_len = max_model_len
        self.args = args
        self.prefixes = [self._span(self.rng.randrange(256, 512)) for _ in range(3)]

    def _span(self, n: int) -> list[int]:
        start = self.rng.randrange(len(self.corpus))
        return [self.corpus[(start + i) % len(self.corpus)] for i in range(n)]

    def request(self, i: int) -> dict:
        rng, a = self.rng, self.args
        max_tokens = rng.choice([1, 8, 32, 64, 128])
        room = self.max_model_len - max_tokens
        length = min(room, int(room * rng.random() ** 0.7) + 1)     # mixed, some near the limit
        prompt = []
        if rng.random() < a.prefix_share:
            prefix = rng.choice(self.prefixes)
            prompt = prefix[:length]
        prompt = prompt + self._span(length - len(prompt))
        greedy = rng.random() < 0.5
        return {"i": i, "prompt": prompt, "max_tokens": max_tokens, "stream": rng.random() < a.stream_share,
                "cancel_after": rng.randint(1, 4) if rng.random() < a.cancel_share else 0,
                "temperature": 0.0 if greedy else 0.8, "seed": None if greedy else rng.randrange(1 << 30)}


async def send(session, url: str, model: str, req: dict, timeout: float) -> dict:
    """One request; returns its record: outcome ok / cancelled / failed (with the reason)."""
    import aiohttp

    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "stream": req["stream"],
            "temperature": req["temperature"], "ignore_eos": req["i"] % 2 == 0}
    if req["seed"] is not None:
        body["seed"] = req["seed"]
    rec = {"i": req["i"], "prompt_tokens": len(req["prompt"]), "max_tokens": req["max_tokens"],
           "stream": req["stream"], "cancel": bool(req["cancel_after"]), "t0": time.time()}
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                rec.update(outcome="failed", reason=f"HTTP {r.status}: {(await r.text())[:300]}")
                return rec
            if not req["stream"]:
                data = await r.json()
                finish = data["choices"][0].get("finish_reason")
                rec.update(outcome="ok" if finish in ("stop", "length") else "failed",
                           reason=None if finish in ("stop", "length") else f"finish_reason {finish!r}")
                return rec
            chunks, done, finish = 0, False, None
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                data = json.loads(payload)
                if "error" in data:
                    rec.update(outcome="failed", reason=f"stream error: {str(data['error'])[:300]}")
                    return rec
                if data.get("choices"):
                    finish = data["choices"][0].get("finish_reason") or finish
                chunks += 1
                if req["cancel_after"] and chunks >= req["cancel_after"]:
                    r.close()                                     # client disconnect: the server aborts it
                    rec.update(outcome="cancelled", chunks=chunks)
                    return rec
            ok = done and finish in ("stop", "length")
            rec.update(outcome="ok" if ok else "failed", chunks=chunks,
                       reason=None if ok else f"stream ended (done={done}, finish_reason={finish!r})")
            return rec
    except Exception as e:   # noqa: BLE001 - every error is a failed request, with its reason
        rec.update(outcome="failed", reason=f"{type(e).__name__}: {e}"[:300])
        return rec
    finally:
        rec["seconds"] = round(time.time() - rec["t0"], 3)


def probe(url: str, model: str, prompt: list[int]) -> str:
    """The lossless probe's greedy answer; an error's text when it fails (then it differs from the first)."""
    try:
        return http_post(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 32,
                                                   "temperature": 0.0})["choices"][0]["text"]
    except (OSError, ValueError, KeyError) as e:
        return f"<probe failed: {type(e).__name__}: {e}>"


def shape_sweep(url: str, model: str, workload: Workload, n: int, parallel: int) -> int:
    """Meet the step shapes first: the worker caches a oneDNN matmul primitive per token count of a
    step (the exact count: vLLM pads nothing on CPU), up to oneDNN's 1,024 entries of about 0.33 MiB,
    so a mixed load meets new counts for tens of minutes and the worker's RSS climbs until that cache
    is full (docs/results.md, "Soak"). One prompt of each length 1..n, one at a time with one new
    token (a step of exactly that many tokens; the first token is unique, so no prefix-cache hit
    shortens it), then ``parallel`` prompts of max_model_len - 1 tokens at once (the largest steps:
    oneDNN's scratchpad only grows). Returns the number of requests sent."""
    from concurrent.futures import ThreadPoolExecutor

    def one(tag: int, length: int) -> None:
        prompt = [1000 + tag] + workload._span(length - 1)
        http_post(url + "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0})

    for length in range(1, n + 1):
        one(length, length)
    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(lambda i: one(n + 1 + i, workload.max_model_len - 1), range(parallel)))
    return n + parallel


# ------------------------------------------------------------------------------------------- the run
async def load(url: str, model: str, args, workload: Workload, root_pid: int | None, state: dict) -> None:
    import aiohttp

    end = time.monotonic() + args.minutes * 60
    counter = iter(range(1 << 40))

    async def client():
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < end:
                state["records"].append(await send(session, url, model, workload.request(next(counter)),
                                                   args.request_timeout))

    async def sampler():
        t_start = time.monotonic()
        next_probe = t_start + args.probe_every
        while time.monotonic() < end:
            if root_pid is not None:
                pids = server_pids(root_pid)
                state["rss"].append({"t": round(time.monotonic() - t_start, 1),
                                     **{str(p): rss_bytes(p) for p in pids}})
            if time.monotonic() >= next_probe:
                text = await asyncio.to_thread(probe, url, model, state["probe_prompt"])
                state["probes"].append({"t": round(time.monotonic() - t_start, 1), "text": text})
                next_probe += args.probe_every
            await asyncio.sleep(args.rss_every)

    await asyncio.gather(sampler(), *(client() for _ in range(args.concurrency)))


def rss_summary(samples: list[dict], warmup_s: float) -> dict:
    totals = [(s["t"], sum(v for k, v in s.items() if k != "t")) for s in samples]
    after = [v for t, v in totals if t >= warmup_s]
    if not after:
        return {"samples": len(totals), "warmup_s": warmup_s, "growth": None}
    base = after[0]
    first = next(s for s in samples if s["t"] >= warmup_s)
    per_process = {}      # each process's growth after warm-up (informational; the check is on the total)
    for pid, rss0 in first.items():
        if pid != "t" and rss0:
            peak = max(s.get(pid, 0) for s in samples if s["t"] >= warmup_s)
            per_process[pid] = {"at_warmup_mib": round(rss0 / 2**20, 1), "max_mib": round(peak / 2**20, 1),
                                "growth": round(peak / rss0 - 1, 4)}
    return {"samples": len(totals), "warmup_s": warmup_s, "rss_at_warmup_mib": round(base / 2**20, 1),
            "rss_end_mib": round(after[-1] / 2**20, 1), "rss_max_after_warmup_mib": round(max(after) / 2**20, 1),
            "growth": round(max(after) / base - 1, 4), "processes": len(samples[-1]) - 1,
            "max_process_growth": max((v["growth"] for v in per_process.values()), default=0.0),
            "per_process": per_process}


def total_rss(root_pid: int | None) -> float | None:
    """MiB of all server processes together (None without a pid)."""
    return None if root_pid is None else round(sum(rss_bytes(p) for p in server_pids(root_pid)) / 2**20, 1)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc = None
    if args.url:
        url, root_pid = check_loopback(args.url), args.server_pid
    else:
        proc, url = start_server(args, out / "server.log")
        root_pid = proc.pid
    try:
        model = json.loads(http_get(url + "/v1/models"))["data"][0]["id"]
        corpus = http_post(url + "/tokenize", {"model": model, "prompt": FILLER * 40})["tokens"]
        workload = Workload(corpus, args.max_model_len, args.seed, args)
        probe_prompt = workload.prefixes[0] + workload._span(200)
        state = {"records": [], "rss": [], "probes": [], "probe_prompt": probe_prompt}
        first = probe(url, model, probe_prompt)
        if first.startswith("<probe failed"):
            raise RuntimeError(f"the first probe failed: {first}")
        state["probes"].append({"t": 0.0, "text": first})
        processes = {str(p): process_info(p) for p in server_pids(root_pid)} if root_pid is not None else {}
        sweep = {"requests": 0}
        if args.shape_sweep:
            rss0, ts = total_rss(root_pid), time.monotonic()
            sweep["requests"] = shape_sweep(url, model, workload, args.shape_sweep, args.max_num_seqs)
            sweep.update(seconds=round(time.monotonic() - ts, 1), rss_before_mib=rss0,
                         rss_after_mib=total_rss(root_pid))
        t0 = time.monotonic()
        asyncio.run(load(url, model, args, workload, root_pid, state))
        load_s = time.monotonic() - t0
        # drain: every request finished or aborted, nothing left running or waiting
        deadline, body, left = time.monotonic() + 120, "", float("nan")
        while time.monotonic() < deadline:
            try:
                body = http_get(url + "/metrics")
            except OSError:          # a dead server: counted as not drained (left = NaN)
                break
            left = metric(body, "vllm:num_requests_running") + metric(body, "vllm:num_requests_waiting")
            if left == 0:
                break
            time.sleep(2)
        last = probe(url, model, probe_prompt)
        state["probes"].append({"t": round(time.monotonic() - t0, 1), "text": last})
        try:
            body = http_get(url + "/metrics")
        except OSError:
            pass
        try:
            stats = json.loads(http_get(url + "/mikv/stats"))
        except OSError:
            stats = {}
    finally:
        if proc is not None:
            stop_server(proc)
    recs = state["records"]
    failed = [r for r in recs if r["outcome"] == "failed"]
    changed = [p for p in state["probes"] if p["text"] != first]
    rss = rss_summary(state["rss"], args.warmup_minutes * 60) if root_pid is not None else {"growth": None}
    summary = {
        "minutes": args.minutes, "load_seconds": round(load_s, 1), "concurrency": args.concurrency,
        "policy": args.policy, "mikv_config": args.mikv_config if args.policy == "mikv" else None,
        "max_model_len": args.max_model_len,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes, "capacity_tokens": stats.get("capacity_tokens"),
        "requests": len(recs), "ok": sum(r["outcome"] == "ok" for r in recs),
        "cancelled": sum(r["outcome"] == "cancelled" for r in recs), "failed": len(failed),
        "streamed": sum(r["stream"] for r in recs), "prompt_tokens_max": max((r["prompt_tokens"] for r in recs), default=0),
        "preemptions": metric(body, "vllm:num_preemptions_total"),
        "prefix_cache_hits": metric(body, "vllm:prefix_cache_hits_total"),
        "prefix_cache_queries": metric(body, "vllm:prefix_cache_queries_total"),
        "left_running": left, "probes": len(state["probes"]), "probe_changed": len(changed),
        "probe_text": first, "rss": rss, "shape_sweep": sweep, "cpu": cpu_model(), "failures": failed[:20],
        "server_processes": processes,
    }
    checks = {"no failed request": not failed, "probe unchanged": not changed, "drained": left == 0,
              "preempted": summary["preemptions"] > 0, "prefix hits": summary["prefix_cache_hits"] > 0,
              "cancelled some": summary["cancelled"] > 0,
              f"RSS growth after warm-up < {args.max_rss_growth:.0%} (every server process)":
                  rss["growth"] is not None and rss["max_process_growth"] < args.max_rss_growth}
    summary["checks"] = checks
    summary["passed"] = all(checks.values())
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "requests.json").write_text(json.dumps(recs) + "\n")
    pids = sorted({k for s in state["rss"] for k in s if k != "t"})
    (out / "rss.csv").write_text("t," + ",".join(pids) + "\n" + "".join(
        f"{s['t']}," + ",".join(str(s.get(p, "")) for p in pids) + "\n" for s in state["rss"]))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def markdown(s: dict) -> str:
    r = s["rss"]
    lines = [f"# Soak ({s['policy']}): {s['minutes']} min, concurrency {s['concurrency']} ({s['cpu']})", "",
             f"config `{s['mikv_config']}`, max_model_len {s['max_model_len']}, KV "
             f"{s['kv_cache_memory_bytes'] / 2**20:.0f} MiB ({s['capacity_tokens']} tokens)", "",
             "| requests | ok | cancelled | failed | streamed | preemptions | prefix hits / queries | probes (changed) "
             "| RSS total after warm-up -> max (growth) | largest growth of one process |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {s['requests']} | {s['ok']} | {s['cancelled']} | {s['failed']} | {s['streamed']} | "
             f"{s['preemptions']:.0f} | {s['prefix_cache_hits']:.0f} / {s['prefix_cache_queries']:.0f} | "
             f"{s['probes']} ({s['probe_changed']}) | {r.get('rss_at_warmup_mib')} -> "
             f"{r.get('rss_max_after_warmup_mib')} MiB ({(r['growth'] or 0) * 100:.2f} %) | "
             f"{r.get('max_process_growth', 0) * 100:.2f} % |", ""]
    w = s.get("shape_sweep") or {}
    if w.get("requests"):
        lines += [f"Shape sweep before the load: {w['requests']} requests in {w['seconds']} s, server RSS "
                  f"{w['rss_before_mib']} -> {w['rss_after_mib']} MiB.", ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in s["checks"].items()]
    lines += ["", "| pid | process | tcmalloc |", "|---|---|---|"] + [
        f"| {pid} | `{p['name']}` | {p['tcmalloc']} |" for pid, p in s.get("server_processes", {}).items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=2.0, help="load duration (the run stops by itself)")
    p.add_argument("--warmup-minutes", type=float, default=None,
                   help="RSS growth is measured from here (default: a quarter of --minutes)")
    p.add_argument("--shape-sweep", type=int, default=320, metavar="N",
                   help="before the load: prompts of 1..N tokens one at a time, then max_num_seqs long ones "
                        "at once, so the worker meets the step shapes it caches (0: none)")
    p.add_argument("--concurrency", type=int, default=3, help="clients sending requests back to back")
    p.add_argument("--model", default=None, help="model dir (default: the embedded model, prepare_model())")
    p.add_argument("--url", default=None, help="use this running server (loopback only) instead of starting one")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: its pid, for the RSS samples")
    p.add_argument("--policy", choices=["mikv", "stock"], default="mikv",
                   help="stock: the same soak against stock vLLM (no MiKV flags), for comparison")
    p.add_argument("--mikv-config", default=LOSSLESS, help="the server's --mikv-config (default: lossless r = 1)")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=96 << 20, help="small, so that vLLM preempts")
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--server-arg", action="append", default=[], help="extra `vllm serve` argument (repeatable)")
    p.add_argument("--prefix-share", type=float, default=0.5)
    p.add_argument("--stream-share", type=float, default=0.5)
    p.add_argument("--cancel-share", type=float, default=0.2)
    p.add_argument("--probe-every", type=float, default=60.0, help="seconds between lossless probes")
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--max-rss-growth", type=float, default=0.05)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output dir (default: a new temporary dir)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.concurrency < 1:
        p.error("--minutes must be > 0 and --concurrency >= 1")
    if args.warmup_minutes is None:
        args.warmup_minutes = args.minutes / 4
    if not 0 <= args.warmup_minutes < args.minutes:
        p.error("--warmup-minutes must lie in [0, --minutes)")
    if not 0 <= args.shape_sweep < args.max_model_len:
        p.error("--shape-sweep must lie in [0, --max-model-len)")
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="mikv-soak-")
    if args.model is None and args.url is None:
        from mikv_vllm.model import prepare_model

        args.model = str(prepare_model(progress=False))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = run(args)
    print(markdown(s))
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
