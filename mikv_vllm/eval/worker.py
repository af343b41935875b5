"""One config, all probes: ``python -m mikv_vllm.eval.worker SPEC.json RESULT.json``.

The runner starts this module in a fresh process per config (a fresh process
also frees everything the engines held). The workload needs two prefill
regimes, each set with vLLM's own engine arguments, so the worker runs two
engines of the same config one after the other (engine core in-process,
``VLLM_ENABLE_V1_MULTIPROCESSING=0``):

* retrieval / agreement: chunked prefill off and a token budget of at least
  the longest prompt -> every prompt is prefilled in one piece;
* perplexity: chunked prefill on with a budget of ``ppl_chunk`` tokens and one
  request at a time -> chunks of exactly ``ppl_chunk`` tokens.

The decode perplexity probe (a full-precision prefix, then teacher-forced decode steps) runs on the
first engine, with the :class:`~.forcing.ForcedTokens` logits processor.

Requests are submitted in waves that fit the engine's KV capacity, so no
request is ever preempted (a recomputed MiKV request would be re-prefilled at
full precision). Progress goes to stdout as ``@@progress {json}`` lines.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from typing import Any

PROGRESS = "@@progress "


def _emit(**kw: Any) -> None:
    print(PROGRESS + json.dumps(kw), flush=True)


def _engine_env(threads: int | None) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for k, v in (("VLLM_NO_USAGE_STATS", "1"), ("DO_NOT_TRACK", "1"), ("HF_HUB_OFFLINE", "1"),
                 ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)


def _engine(spec: dict[str, Any], cfg, workload, ppl: bool):
    """The engine of one prefill regime (see the module docstring); only vLLM's own engine arguments."""
    from vllm import LLM

    max_model_len = int(spec.get("max_model_len", 4096))
    if ppl:
        regime = dict(enable_chunked_prefill=True, max_num_batched_tokens=workload.ppl_chunk, max_num_seqs=1)
    else:
        regime = dict(enable_chunked_prefill=False,
                      max_num_batched_tokens=max(max_model_len, workload.max_prompt_tokens))
    kwargs: dict[str, Any] = dict(
        model=spec["model"], dtype=spec.get("dtype", "float32"), enforce_eager=True, max_model_len=max_model_len,
        kv_cache_memory_bytes=int(spec.get("kv_cache_memory_bytes", 1 << 30)), seed=int(spec.get("seed", 0)),
        disable_log_stats=True, **regime,
        # every trial measures a cold request: trials share filler text, and a prefix-cache hit reads
        # the shared blocks' lo copies (docs/design.md, "Shared blocks"); hits: benchmarks/prefix_quality.py
        enable_prefix_caching=False)
    additional = cfg.additional_config()
    if additional is not None:
        kwargs["additional_config"] = additional
    if not ppl and workload.decode_windows:
        from .forcing import ForcedTokens

        kwargs["logits_processors"] = [ForcedTokens]
    return LLM(**kwargs)


def _close(llm) -> None:
    """Free an engine before the next one starts in this process (vLLM's documented teardown)."""
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def engine_info(llm, kv_cache_memory_bytes: int) -> dict[str, Any]:
    vc = llm.llm_engine.vllm_config
    mc, pc, cc = vc.model_config, vc.parallel_config, vc.cache_config
    blocks = int(cc.num_gpu_blocks)
    block_size = int(cc.block_size)
    layers = int(mc.get_num_layers(pc))
    kv_heads = int(mc.get_num_kv_heads(pc))
    capacity = blocks * block_size
    info = {
        "num_gpu_blocks": blocks,
        "block_size": block_size,
        "capacity_tokens": capacity,
        "kv_cache_memory_bytes": kv_cache_memory_bytes,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": int(mc.get_head_size()),
        "dtype": str(mc.dtype).replace("torch.", ""),
        "implied_bytes_per_token_per_head": kv_cache_memory_bytes / max(1, capacity * layers * kv_heads),
    }
    try:  # MiKV's own view of its page (absent for stock vLLM)
        stats = llm.collective_rpc("mikv_stats")
        if stats and isinstance(stats[0], dict) and stats[0].get("enabled"):
            s = stats[0]
            info["mikv_stats"] = {k: s.get(k) for k in ("bytes_per_token_per_head", "capacity_tokens",
                                                        "hi_slots_per_block", "num_blocks")}
    except Exception as e:  # noqa: BLE001 - informative only
        info["mikv_stats_error"] = repr(e)[:200]
    return info


def _run_requests(llm, reqs, make_params, on_done, budget_blocks: int, block_size: int) -> None:
    """Run ``reqs`` to completion in capacity-sized waves; ``on_done(req, output)`` per finished one."""
    engine = llm.llm_engine
    i = 0
    while i < len(reqs):
        wave, used = [], 0
        while i < len(reqs):
            r = reqs[i]
            need = math.ceil((r.num_prompt_tokens + r.max_tokens + 1) / block_size) + 1
            if wave and used + need > budget_blocks:
                break
            wave.append(r)
            used += need
            i += 1
        by_id = {}
        for r in wave:
            engine.add_request(r.rid, r.prompt, make_params(r))
            by_id[r.rid] = r
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id in by_id:
                    on_done(by_id.pop(out.request_id), out)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    _engine_env(spec.get("threads"))
    from .configs import EvalConfig
    from .workload import Workload, build_requests, score_request

    cfg = EvalConfig.from_dict(spec["config"])
    workload = Workload.from_dict(spec["workload"])
    kv_bytes = int(spec.get("kv_cache_memory_bytes", 1 << 30))
    t0 = time.time()
    _emit(event="starting", label=cfg.label)

    from vllm import SamplingParams

    llm = _engine(spec, cfg, workload, ppl=False)
    t_start = time.time() - t0
    info = engine_info(llm, kv_bytes)
    _emit(event="started", seconds=t_start, capacity_tokens=info["capacity_tokens"])
    reqs = build_requests(workload, llm.get_tokenizer())
    total_cost = sum(r.cost for r in reqs)
    done_cost = 0.0
    records: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {"engine_start": t_start}

    def on_done(req, out):
        nonlocal done_cost
        records.setdefault(req.probe, []).append(score_request(req, out))
        done_cost += req.cost
        _emit(event="request", probe=req.probe, done=done_cost, total=total_cost)

    def params(req):
        kw: dict[str, Any] = dict(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=req.ignore_eos)
        if req.prompt_logprobs:
            kw["prompt_logprobs"] = 0
        if req.forced is not None:
            from .forcing import KEY

            kw.update(logprobs=0, extra_args={KEY: req.forced})
        return SamplingParams(**kw)

    budget_blocks = int(info["num_gpu_blocks"] * 0.9)
    # 1) retrieval + agreement: whole-prompt (full precision) prefill
    t = time.time()
    _run_requests(llm, [r for r in reqs if r.probe != "ppl"], params, on_done, budget_blocks, info["block_size"])
    timings["retrieval_agreement"] = time.time() - t
    # 2) perplexity: chunked prefill, one request at a time, on an engine built for it
    ppl_reqs = [r for r in reqs if r.probe == "ppl"]
    if ppl_reqs:
        t = time.time()
        _close(llm)
        llm = _engine(spec, cfg, workload, ppl=True)
        timings["ppl_engine_start"] = time.time() - t
        for r in ppl_reqs:
            _run_requests(llm, [r], params, on_done, budget_blocks, info["block_size"])
        timings["ppl"] = time.time() - t
    timings["total"] = time.time() - t0
    for recs in records.values():
        recs.sort(key=lambda x: x["id"])
    return {
        "config": cfg.to_dict(),
        "workload": workload.to_dict(),
        "workload_digest": workload.digest(),
        "model": spec["model"],
        "engine": info,
        "probes": records,
        "timings": timings,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m mikv_vllm.eval.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as fh:
        spec = json.load(fh)
    try:
        result = run(spec)
    except Exception:
        traceback.print_exc()
        _emit(event="error", message=traceback.format_exc(limit=3)[-400:])
        return 1
    tmp = argv[1] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, argv[1])
    _emit(event="done", seconds=result["timings"]["total"])
    return 0


if __name__ == "__main__":
    rc = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)  # skip engine teardown (it can hang); the process is done
