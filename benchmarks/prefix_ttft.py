"""Prefix caching under a MiKV policy: time to first token of a cached ~1k-token prefix vs cold.

Starts ``vllm serve MODEL --kv-cache-policy POLICY`` with default flags (prefix caching on, as stock
vLLM) per policy, then per round: a new ~1k-token document with a pass key, asked once (cold) and
once more with another question (its document blocks come from the cache). Prints each request's
TTFT (streamed, first chunk), the hit / cold ratio, the answers' correctness and
``vllm:prefix_cache_hits`` from /metrics. Both sides run in one server, one run.

    python benchmarks/prefix_ttft.py [--policies mikv,stock] [--rounds 3] [--doc-tokens 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

QUESTIONS = ["\n\nWhat is the pass key? The pass key is",
             "\n\nQuestion: which number is the pass key?\nAnswer: the pass key is"]


def _get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def start_server(model: str, policy: str | None, port: int, log) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mikv_vllm.cli", "serve", model, "--port", str(port), "--max-model-len", "2048",
           "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0",
           "--enable-prompt-tokens-details"]     # no prefix-caching flag: vLLM's default (on)
    if policy:
        cmd += ["--kv-cache-policy", policy]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; log: {log.name}")
        try:
            _get(f"http://127.0.0.1:{port}/health", 5)
            return proc
        except OSError:
            time.sleep(2)
    proc.terminate()
    raise RuntimeError(f"vllm serve did not come up; log: {log.name}")


def prefix_hits(port: int) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in _get(f"http://127.0.0.1:{port}/metrics").splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def timed(client, model: str, prompt: str) -> tuple[float, str, int]:
    """(TTFT s, text, cached prompt tokens) of one streamed greedy completion."""
    t0 = time.perf_counter()
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    ttft, text, cached = None, "", 0
    for chunk in stream:
        if ttft is None and chunk.choices:
            ttft = time.perf_counter() - t0
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:   # last chunk
            cached = int(chunk.usage.prompt_tokens_details.cached_tokens or 0)
    return ttft, text, cached


def run_policy(model: str, policy: str | None, args) -> dict:
    import openai
    from transformers import AutoTokenizer

    from mikv_vllm.eval.passkey import is_correct, make_trial

    tok = AutoTokenizer.from_pretrained(model)
    port = args.port
    log = tempfile.NamedTemporaryFile("w", prefix=f"prefix-ttft-{policy or 'stock'}-", suffix=".log", delete=False)
    proc = start_server(model, policy, port, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", timeout=600, max_retries=0)
        timed(client, model, "Warm-up. " * 20)                       # first-request costs off the clock
        rounds, nonce = [], random.Random().randrange(10**9)
        for i in range(args.rounds):
            trial = make_trial(tok, args.doc_tokens, 0.4, random.Random(1000 + i))
            # a unique first line: no block of this document is cached before its cold request
            doc = f"Document {nonce}-{i}.\n" + trial.prompt[: trial.prompt.rindex("\n\nWhat is the pass key?")]
            before = prefix_hits(port)
            cold = timed(client, model, doc + QUESTIONS[0])
            hit = timed(client, model, doc + QUESTIONS[1])
            rounds.append({"cold_ttft_s": cold[0], "hit_ttft_s": hit[0], "ratio": hit[0] / cold[0],
                           "cold_cached": cold[2], "hit_cached": hit[2], "hits_metric": prefix_hits(port) - before,
                           "cold_correct": is_correct(trial, cold[1]), "hit_correct": is_correct(trial, hit[1]),
                           "prompt_tokens": len(tok.encode(doc + QUESTIONS[1]))})
            print(json.dumps({"policy": policy or "stock", **rounds[-1]}), flush=True)
        return {"policy": policy or "stock", "rounds": rounds, "hits_total": prefix_hits(port), "log": log.name}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)     # the server and its engine process
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the embedded model)")
    ap.add_argument("--policies", default="mikv", help="comma list; 'stock' = no MiKV policy")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--port", type=int, default=8471)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from mikv_vllm.model import prepare_model

        model = str(prepare_model(progress=False))
    results = [run_policy(model, None if p == "stock" else p, args) for p in args.policies.split(",")]
    print("\n| policy | TTFT cold (s) | TTFT hit (s) | hit / cold | cached tokens (hit) | answers correct "
          "| vllm:prefix_cache_hits |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        rs = r["rounds"]
        med = statistics.median
        correct = sum(x["cold_correct"] + x["hit_correct"] for x in rs)
        print(f"| {r['policy']} | {med(x['cold_ttft_s'] for x in rs):.3f} | {med(x['hit_ttft_s'] for x in rs):.3f} "
              f"| {med(x['ratio'] for x in rs):.3f}x | {med(x['hit_cached'] for x in rs):.0f} "
              f"| {correct}/{2 * len(rs)} | {r['hits_total']:.0f} |")
    print("(medians over rounds; each round a new document, cold request then the cached one)")


if __name__ == "__main__":
    main()
