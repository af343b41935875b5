"""KV capacity and output throughput per policy at the same KV memory, from one run.

For stock vLLM and the ``rtn``, ``h2o`` and ``mikv`` policies, one engine at a
time with the same ``--kv-cache-memory-bytes``: the engine's KV capacity in
tokens, then ``--requests`` concurrent greedy requests with long prompts; prints
a Markdown table with ratios to stock. Not a test: numbers depend on the machine.

    python benchmarks/capacity_throughput.py                # fp32, 64 requests
    python benchmarks/capacity_throughput.py --dtype bfloat16 --kv-mib 256
    python benchmarks/capacity_throughput.py --policies stock,mikv --load decode-heavy --ttft 2048

``--load`` names the loads of issue 12: ``decode-heavy`` (512 prompt -> 256 output tokens) and
``prefill-heavy`` (768 -> 64). ``--ttft N`` also times one N-token prompt alone (1 output token)
in each engine: the time to first token, after a short warm-up request.
"""

from __future__ import annotations

import argparse
import json
import time


LOADS = {"decode-heavy": (512, 256), "prefill-heavy": (768, 64)}


def run_policy(model_dir: str, policy: str | None, args) -> dict:
    from vllm import SamplingParams

    from mikv_vllm.eval.engine import capacity_tokens, offline_engine

    max_len = max(args.prompt_tokens + args.max_tokens, args.ttft + 1) + 64
    with offline_engine(model_dir, policy, dtype=args.dtype, kv_cache_memory_bytes=args.kv_mib << 20,
                        max_model_len=max_len) as llm:
        tok = llm.get_tokenizer()
        text = ("The history of the lighthouse keeper is a long one, full of storms and quiet nights. " * 200)
        ids = tok.encode(text)[: args.prompt_tokens]
        prompts = [{"prompt_token_ids": [ids[0], 1000 + i] + ids[2:]} for i in range(args.requests)]
        sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        seconds = time.perf_counter() - t0
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        row = {"policy": policy or "stock", "capacity_tokens": capacity_tokens(llm),
               "output_tokens": generated, "seconds": seconds, "output_tok_s": generated / seconds}
        if args.ttft:
            one = SamplingParams(temperature=0.0, max_tokens=1)
            llm.generate([{"prompt_token_ids": ids[:16]}], one, use_tqdm=False)     # warm-up
            long_ids = (ids * (args.ttft // len(ids) + 1))[: args.ttft]
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": long_ids}], one, use_tqdm=False)
            row["ttft_s"] = time.perf_counter() - t0
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model dir (default: the embedded model)")
    ap.add_argument("--policies", default="stock,rtn,h2o,mikv")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-mib", type=int, default=128, help="KV cache memory for every engine (MiB)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--load", choices=sorted(LOADS), default=None,
                    help="named load (sets --prompt-tokens / --max-tokens)")
    ap.add_argument("--ttft", type=int, default=0, help="also time the first token of one prompt of this many tokens")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.load:
        args.prompt_tokens, args.max_tokens = LOADS[args.load]
    model_dir = args.model
    if model_dir is None:
        from mikv_vllm.model import prepare_model

        model_dir = str(prepare_model(progress=False))
    rows = []
    for name in args.policies.split(","):
        rows.append(run_policy(model_dir, None if name == "stock" else name, args))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["policy"] == "stock"), rows[0])
    print(f"\n{args.requests} requests x {args.prompt_tokens} prompt tokens, {args.max_tokens} output tokens, "
          f"{args.dtype}, KV memory {args.kv_mib} MiB\n")
    ttft = bool(args.ttft)
    print("| policy | KV capacity (tokens) | vs stock | output tok/s | vs stock |"
          + (f" TTFT {args.ttft} tok (s) | vs stock |" if ttft else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if ttft else ""))
    for r in rows:
        print(f"| {r['policy']} | {r['capacity_tokens']:,} | {r['capacity_tokens'] / base['capacity_tokens']:.2f}x "
              f"| {r['output_tok_s']:.1f} | {r['output_tok_s'] / base['output_tok_s']:.2f}x |"
              + (f" {r['ttft_s']:.2f} | {r['ttft_s'] / base['ttft_s']:.2f}x |" if ttft else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
