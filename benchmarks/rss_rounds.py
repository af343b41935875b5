"""RSS of one in-process engine over rounds of mixed-length requests: which allocator holds memory.

Runs ``vllm.LLM`` in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: engine and worker here) with the
soak's small KV budget and prefix caching, sends ``--prompts`` token-id prompts per round (random lengths
up to ``--max-len``, or a fixed handful of lengths with ``--fixed-lengths``) and prints, after each round,
the process RSS and glibc's heap accounting (``mallinfo2``: bytes in use vs free bytes held in malloc's
arenas; zero when another allocator replaced malloc). The allocator is this process's: run it plainly for
glibc malloc, or with ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4`` for tcmalloc
(what mikv-vllm preloads into a server's engine processes, docs/usage.md ``MIKV_CPU_MALLOC``).

    python benchmarks/rss_rounds.py --policy mikv --rounds 7
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/rss_rounds.py --policy mikv
    python benchmarks/rss_rounds.py --policy stock --rounds 7
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import time
from pathlib import Path


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


def memory() -> dict:
    """RSS and glibc heap accounting of this process, MiB."""
    rss = next(int(line.split()[1]) >> 10 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return {"rss_mib": rss, "malloc_in_use_mib": (m.uordblks + m.hblkhd) >> 20, "malloc_free_held_mib": m.fordblks >> 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", choices=["mikv", "stock"], default="mikv")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompts", type=int, default=24, help="prompts per round")
    p.add_argument("--max-len", type=int, default=1000)
    p.add_argument("--fixed-lengths", action="store_true", help="five prompt lengths only (shapes repeat)")
    p.add_argument("--model", default=None, help="model dir (default: the embedded model)")
    args = p.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS"):
        os.environ.setdefault(k, "1")
    from vllm import LLM, SamplingParams

    from mikv_vllm.eval.engine import engine_kwargs
    from mikv_vllm.model import prepare_model

    model = args.model or str(prepare_model())
    llm = LLM(model=model, **engine_kwargs(None if args.policy == "stock" else "mikv", None, max_model_len=1024,
                                           kv_cache_memory_bytes=96 << 20, max_num_seqs=8, enable_prefix_caching=True))
    rng = random.Random(0)
    fixed = [17, 130, 257, 511, 900]

    def prompts() -> list[dict]:
        lens = [rng.choice(fixed) if args.fixed_lengths else rng.randint(1, args.max_len) for _ in range(args.prompts)]
        return [{"prompt_token_ids": [rng.randint(100, 40000) for _ in range(n)]} for n in lens]

    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    tcmalloc = "libtcmalloc" in Path("/proc/self/maps").read_text()
    print(json.dumps({"policy": args.policy, "tcmalloc": tcmalloc, "fixed_lengths": args.fixed_lengths}), flush=True)
    llm.generate(prompts(), sp, use_tqdm=False)      # warm-up round
    for r in range(args.rounds):
        t = time.perf_counter()
        llm.generate(prompts(), sp, use_tqdm=False)
        gc.collect()
        print(json.dumps({"round": r, "s": round(time.perf_counter() - t, 1), **memory()}), flush=True)


if __name__ == "__main__":
    main()
