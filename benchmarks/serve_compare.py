"""Stock vLLM vs MiKV behind the OpenAI API: ``vllm bench serve`` on both servers, one after the other.

Per scenario, a ``vllm serve`` of the embedded model (fp32, ``--enforce-eager``, the same
``--kv-cache-memory-bytes``; ``VLLM_CPU_KVCACHE_SPACE`` is unset because it would override that)
without and with ``--kv-cache-policy``, each driven by the same ``vllm bench serve`` run (random
token prompts, ``--ignore-eos``, seed 0). Prints a Markdown table: output tok/s, median TTFT and
TPOT, failed requests, the servers' KV capacity in tokens, and MiKV / stock. Not a test: the
numbers depend on the machine; the CPU model is printed with them.

Scenarios (``--scenarios``, default all):

* ``mem``    48 prompts 512 -> 256, concurrency 24, 0.2 GiB of KV (stock fits ~6 requests)
* ``nomem``  the same with 1 GiB (both fit all 24)
* ``prefill`` 48 prompts 768 -> 64, concurrency 24, 0.2 GiB
* ``long``   12 prompts 3000 -> 128, concurrency 12, 2 GiB, ``--max-model-len 4096``

    python benchmarks/serve_compare.py [--policy mikv] [--scenarios mem nomem prefill long] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_layer import cpu_model  # noqa: E402
from helpers import vllm_server  # noqa: E402

CAPACITY_RE = re.compile(r"KV cache size: ([\d,]+) tokens")


@dataclass(frozen=True)
class Scenario:
    prompts: int
    input_len: int
    output_len: int
    concurrency: int
    kv_bytes: int
    max_model_len: int


SCENARIOS = {
    "mem": Scenario(48, 512, 256, 24, 214748364, 1024),
    "nomem": Scenario(48, 512, 256, 24, 1073741824, 1024),
    "prefill": Scenario(48, 768, 64, 24, 214748364, 1024),
    "long": Scenario(12, 3000, 128, 12, 2147483648, 4096),
}


def bench(server, sc: Scenario, out: Path) -> dict:
    """One ``vllm bench serve`` run against ``server``; its saved result."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", "--backend", "vllm",
           "--base-url", server.base_url, "--model", server.model, "--tokenizer", server.model,
           "--dataset-name", "random", "--random-input-len", str(sc.input_len),
           "--random-output-len", str(sc.output_len), "--random-range-ratio", "0",
           "--num-prompts", str(sc.prompts), "--max-concurrency", str(sc.concurrency), "--ignore-eos",
           "--seed", "0", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return json.loads(out.read_text())


def run_side(model: str, policy: str | None, sc: Scenario, out_dir: Path, name: str) -> dict:
    args = ["--kv-cache-memory-bytes", str(sc.kv_bytes), "--max-model-len", str(sc.max_model_len)]
    if policy:
        args += ["--kv-cache-policy", policy]
    log_dir = out_dir / f"{name}-server"
    log_dir.mkdir(exist_ok=True)
    with vllm_server(model, *args, log_dir=log_dir) as server:
        result = bench(server, sc, out_dir / f"{name}.json")
        found = CAPACITY_RE.findall(server.log_path.read_text(errors="replace"))
    result["capacity_tokens"] = int(found[-1].replace(",", "")) if found else None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="mikv", help="the MiKV side's --kv-cache-policy (a preset or YAML)")
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--model", default=None, help="model dir (default: the embedded model, prepared once)")
    p.add_argument("--out", default=None, help="directory for the bench results and server logs")
    args = p.parse_args(argv)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)   # it would override --kv-cache-memory-bytes
    if args.model is None:
        from mikv_vllm.model import prepare_model

        args.model = str(prepare_model())
    out = Path(args.out or tempfile.mkdtemp(prefix="serve-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; fp32, --enforce-eager; results in {out}")
    print("| scenario | stock tok/s | mikv tok/s | mikv / stock | TTFT median ms (stock / mikv) | "
          "TPOT median ms (stock / mikv) | failed (stock / mikv) | KV capacity tokens (stock / mikv) |")
    print("|---|---:|---:|---:|---|---|---|---|")
    summary = {"meta": {"cpu": cpu_model(), "cores": os.cpu_count(), "policy": args.policy, "dtype": "float32",
                        "enforce_eager": True}}
    for name in args.scenarios:
        sc = SCENARIOS[name]
        d = out / name
        d.mkdir(exist_ok=True)
        r = {side: run_side(args.model, pol, sc, d, side) for side, pol in (("stock", None), ("mikv", args.policy))}
        s, m = r["stock"], r["mikv"]
        summary[name] = {"scenario": sc.__dict__, **r}
        print(f"| {name}: {sc.prompts} x {sc.input_len} -> {sc.output_len}, concurrency {sc.concurrency}, "
              f"{sc.kv_bytes / 2**30:.1f} GiB | {s['output_throughput']:.1f} | {m['output_throughput']:.1f} | "
              f"**{m['output_throughput'] / s['output_throughput']:.2f}x** | "
              f"{s['median_ttft_ms']:.0f} / {m['median_ttft_ms']:.0f} | {s['median_tpot_ms']:.0f} / "
              f"{m['median_tpot_ms']:.0f} | {s['failed']} / {m['failed']} | "
              f"{s['capacity_tokens']} / {m['capacity_tokens']} |", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
