"""Stock vLLM vs MiKV servers on one GPU: start-up (torch.compile and CUDA-graph capture times from
the logs), engine TPOT at several contexts x batches, and a lossless MiKV config (every token hi,
fp16 hi copies: ``--mikv-hi-ratio 1 --mikv-hi-dtype float16``) against stock: greedy outputs equal.
All servers run ``--dtype float16`` (fp16 hi copies are then exact), CUDA graphs on.

    python benchmarks/gpu_serve_compare.py --model DIR [--budget-s 420] [--contexts 1024 4096 8000]
        [--batches 1 32] [--dry-run]

TPOT per (context, batch): ``batch`` concurrent requests of ``context`` prompt tokens, timed with
``max_tokens`` 1 and 65; TPOT = (t65 - t1) / 64. Each part that cannot run (time left, a server
that does not start) says why in one line.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "List three uses of copper:\n1.", "def fibonacci(n):",
           "Translate to German: The weather is nice today."]
LOG_TIMES = {"torch.compile": re.compile(r"torch\.compile takes ([\d.]+) s"),
             "graph capture": re.compile(r"Graph capturing finished in ([\d.]+) sec")}


def server_command(model: str, port: int, kind: str, max_model_len: int) -> list[str]:
    cmd = [sys.executable, "-m", "mikv_vllm.cli", "serve", model] if kind != "stock" else \
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model]
    cmd += ["--dtype", "float16", "--max-model-len", str(max_model_len), "--gpu-memory-utilization", "0.45",
            "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--max-num-seqs", "64"]
    if kind == "mikv":
        cmd += ["--kv-cache-policy", "mikv"]
    elif kind == "lossless":
        cmd += ["--kv-cache-policy", "mikv", "--mikv-hi-ratio", "1", "--mikv-hi-dtype", "float16"]
    return cmd


class Server:
    def __init__(self, model: str, kind: str, max_model_len: int, log_dir: str, timeout: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.model, self.kind, self.base = model, kind, f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(log_dir, f"serve-{kind}.log")
        self.cmd = server_command(model, self.port, kind, max_model_len)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        t0 = time.time()
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                     start_new_session=True)
        self.ready_s = None
        while time.time() - t0 < timeout and self.proc.poll() is None:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_s = time.time() - t0
                        break
            except OSError:
                time.sleep(2)

    def log_times(self) -> str:
        text = open(self.log_path, encoding="utf-8", errors="replace").read()
        found = [f"{name} {m.group(1)} s" for name, rx in LOG_TIMES.items() for m in [rx.search(text)] if m]
        return ", ".join(found) or "no compile / capture lines in the log"

    def complete(self, prompt, max_tokens: int) -> list[int] | str:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(self.base + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            choice = json.loads(r.read())["choices"][0]
        return choice.get("token_ids") or choice["text"]

    def batch_seconds(self, ctx: int, batch: int, max_tokens: int) -> float:
        prompts = [[(17 * i + 31 * j) % 20000 + 100 for j in range(ctx)] for i in range(batch)]
        t0 = time.time()
        with cf.ThreadPoolExecutor(batch) as pool:
            list(pool.map(lambda p: self.complete(p, max_tokens), prompts))
        return time.time() - t0

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def plan(args) -> list[str]:
    lines = [f"servers (CUDA graphs, fp16, max_model_len {args.max_model_len}):"]
    for kind in ("stock", "mikv", "lossless"):
        lines.append(f"- {kind}: `{' '.join(server_command('MODEL', 8000, kind, args.max_model_len)[2:])}`")
    lines.append(f"- start-up: seconds to /health; torch.compile and graph-capture seconds from each log")
    lines.append(f"- TPOT stock vs mikv: contexts {args.contexts} x batches {args.batches} (max_tokens 1 and 65)")
    lines.append(f"- lossless vs stock: greedy 32 token ids of {len(PROMPTS)} prompts equal")
    return lines


def run(args) -> int:
    t_end = time.time() + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    servers, failed = {}, []
    for kind in ("stock", "mikv"):
        left = t_end - time.time()
        if left < 60:
            print(f"- {kind} server: not started ({left:.0f} s left of the budget)")
            continue
        srv = Server(args.model, kind, args.max_model_len, args.out, min(240.0, left - 30))
        if srv.ready_s is None:
            print(f"- {kind} server: did not start (log {srv.log_path})")
            failed.append(kind)
            srv.stop()
            continue
        print(f"- {kind} server: ready in {srv.ready_s:.0f} s ({srv.log_times()})", flush=True)
        servers[kind] = srv
    try:
        if len(servers) == 2:
            print("\n| context | batch | stock TPOT ms | MiKV TPOT ms | MiKV / stock |\n|---|---|---|---|---|")
            for ctx in args.contexts:
                for bsz in args.batches:
                    if time.time() > t_end - 90:
                        print(f"| {ctx} | {bsz} | not run: budget spent | | |")
                        continue
                    tpot = {}
                    for kind, srv in servers.items():
                        t1 = srv.batch_seconds(ctx, bsz, 1)
                        tpot[kind] = (srv.batch_seconds(ctx, bsz, 65) - t1) / 64 * 1e3
                    print(f"| {ctx} | {bsz} | {tpot['stock']:.2f} | {tpot['mikv']:.2f} | "
                          f"{tpot['mikv'] / tpot['stock']:.2f}x |", flush=True)
        else:
            print("- TPOT: not run (both servers are needed)")
        if "mikv" in servers:
            servers.pop("mikv").stop()
        left = t_end - time.time()
        if "stock" not in servers or left < 90:
            print(f"- lossless vs stock: not run ({'no stock server' if 'stock' not in servers else f'{left:.0f} s left'})")
        else:
            srv = Server(args.model, "lossless", args.max_model_len, args.out, min(240.0, left - 30))
            try:
                if srv.ready_s is None:
                    print(f"- lossless server: did not start (log {srv.log_path})")
                    failed.append("lossless")
                else:
                    same = [srv.complete(p, 32) == servers["stock"].complete(p, 32) for p in PROMPTS]
                    print(f"- lossless (r = 1, fp16 hi) vs stock, greedy 32 tokens: {sum(same)}/{len(same)} equal")
                    if not all(same):
                        failed.append("lossless equality")
            finally:
                srv.stop()
    finally:
        for srv in servers.values():
            srv.stop()
    print(f"- failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default="serve-compare")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 8000])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    args = ap.parse_args(argv)
    if args.dry_run or not args.model:
        print("\n".join(plan(args)))
        if not args.dry_run:
            print("- not run: no --model")
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
