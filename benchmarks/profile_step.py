"""Where one engine decode step's time goes, stock vLLM vs MiKV, at the same batch (CPU, in-process).

Runs an offline ``LLM`` per policy in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, so the
worker's classes are the ones patched here) with ``--batch`` prompts of ``--prompt-tokens`` tokens
and ``--max-tokens`` output tokens each, and times, in the steps where every row decodes one token
and the batch is full (``--batch`` rows), these components with wall-clock wrappers:

* ``metadata``    the runner's ``_build_attention_metadata`` (incl. the attention metadata builder)
* ``attn op``     the attention kernel calls (stock: vLLM's CPU ``cpu_attn_reshape_and_cache`` +
                  ``cpu_attention_with_kv_cache``; MiKV: the op set's ``decode`` / ``chunks``)
* ``stats``       MiKV's per-layer stats (``LayerStats.begin_step`` / ``end_step``)
* ``attn glue``   the rest of the attention layers' ``forward`` (+ stock's ``do_kv_cache_update``)
* ``model rest``  the model forward minus the attention layers (GEMMs, norms, MLP, rotary)
* ``runner rest`` the rest of ``execute_model`` + ``sample_tokens`` (input prep, sampling, output)

Prints the median ms per full decode step of each component (engines of both policies run
``--rounds`` times, alternating, so a shared machine's noise hits both) and the difference. Not a
test; the machine's CPU is printed with the numbers.

    python benchmarks/profile_step.py [--batch 16] [--prompt-tokens 512] [--max-tokens 48] [--rounds 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

COMPONENTS = ("step", "metadata", "attn op", "stats", "attn glue", "model rest", "runner rest")


class Timers:
    """Wall time per component per step, kept for the steps flagged as full decode steps."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.pending: dict[str, float] = collections.defaultdict(float)
        self.depth: dict[str, int] = collections.defaultdict(int)
        self.decode_step = False

    def wrap(self, owner, name: str, key: str) -> None:
        fn = getattr(owner, name)
        timers = self

        def timed(*args, **kwargs):
            if timers.depth[key]:            # nested (a legacy call into the planned one): count once
                return fn(*args, **kwargs)
            timers.depth[key] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.pending[key] += time.perf_counter() - t0
                timers.depth[key] -= 1

        setattr(owner, name, timed)

    def end_step(self) -> None:
        if self.decode_step:
            self.steps.append(dict(self.pending))
        self.pending.clear()
        self.decode_step = False


def install(timers: Timers, batch: int) -> None:
    """Wrap the runner, both attention impls, MiKV's stats and the attention ops."""
    from vllm.v1.attention.backends import cpu_attn
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from mikv_vllm.vllm_glue import backend, stats

    timers.wrap(GPUModelRunner, "_model_forward", "model")
    timers.wrap(GPUModelRunner, "_build_attention_metadata", "metadata")
    timers.wrap(cpu_attn.CPUAttentionBackendImpl, "forward", "attn")
    timers.wrap(cpu_attn.CPUAttentionBackendImpl, "do_kv_cache_update", "attn")
    timers.wrap(backend.MiKVAttentionImpl, "forward", "attn")
    timers.wrap(stats.LayerStats, "begin_step", "stats")
    timers.wrap(stats.LayerStats, "end_step", "stats")
    for op in ("cpu_attention_with_kv_cache", "cpu_attn_reshape_and_cache"):
        if hasattr(cpu_attn.ops, op):
            timers.wrap(cpu_attn.ops, op, "attn op")
    try:   # the op sets of mikv_vllm.ops (planned classmethods)
        from mikv_vllm.cpu import CpuOps
        from mikv_vllm.ops.torch_ops import TorchOps

        for cls in (CpuOps, TorchOps):
            timers.wrap(cls, "decode", "attn op")
            timers.wrap(cls, "chunks", "attn op")
    except ImportError:   # before the ops package (main 049c2e6)
        from mikv_vllm.cpu import CpuOps

        timers.wrap(CpuOps, "forward_decode", "attn op")
        timers.wrap(CpuOps, "forward_chunks", "attn op")

    execute, sample = GPUModelRunner.execute_model, GPUModelRunner.sample_tokens

    def execute_model(self, scheduler_output, *args, **kwargs):
        n_tok = getattr(scheduler_output, "total_num_scheduled_tokens", 0)
        reqs = len(getattr(scheduler_output, "num_scheduled_tokens", {}) or {})
        timers.decode_step = reqs == batch and n_tok == batch
        t0 = time.perf_counter()
        try:
            return execute(self, scheduler_output, *args, **kwargs)
        finally:
            timers.pending["step"] += time.perf_counter() - t0

    def sample_tokens(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return sample(self, *args, **kwargs)
        finally:
            timers.pending["step"] += time.perf_counter() - t0
            timers.end_step()

    GPUModelRunner.execute_model, GPUModelRunner.sample_tokens = execute_model, sample_tokens


def components(raw: dict[str, float]) -> dict[str, float]:
    """One step's components in ms from the raw wrapper times."""
    t = {k: 1e3 * v for k, v in raw.items()}
    attn, op, st = t.get("attn", 0.0), t.get("attn op", 0.0), t.get("stats", 0.0)
    return {"step": t.get("step", 0.0), "metadata": t.get("metadata", 0.0), "attn op": op, "stats": st,
            "attn glue": attn - op - st, "model rest": t.get("model", 0.0) - attn,
            "runner rest": t.get("step", 0.0) - t.get("model", 0.0) - t.get("metadata", 0.0)}


def run(policy: str | None, args, timers: Timers) -> list[dict[str, float]]:
    """One engine of ``policy`` (None: stock): the full decode steps' components (ms) of one generate."""
    from vllm import SamplingParams

    from mikv_vllm.eval.engine import offline_engine
    from mikv_vllm.model import model_path

    with offline_engine(model_path(), policy, args.preset if policy else None, max_num_seqs=args.batch,
                        max_num_batched_tokens=max(2048, args.prompt_tokens),
                        enforce_eager=not args.compile) as llm:
        prompts = [{"prompt_token_ids": [(17 * i + 31 * j) % 5000 + 100 for j in range(args.prompt_tokens)]}
                   for i in range(args.batch)]
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)   # warm-up
        timers.steps.clear()
        llm.generate(prompts, params, use_tqdm=False)
        return [components(s) for s in timers.steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--preset", default="mikv")
    ap.add_argument("--policies", default="stock,mikv")
    ap.add_argument("--rounds", type=int, default=2, help="engine runs per policy, alternating the order")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager)")
    args = ap.parse_args()
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    timers = Timers()
    install(timers, args.batch)
    policies = args.policies.split(",")
    samples: dict[str, list[dict[str, float]]] = {p: [] for p in policies}
    for r in range(args.rounds):
        for policy in (policies if r % 2 == 0 else policies[::-1]):
            got = run(None if policy == "stock" else "mikv", args, timers)
            samples[policy] += got
            part = {c: statistics.median(s[c] for s in got) for c in COMPONENTS} if got else {}
            print(f"round {r} {policy}: {len(got)} steps, median ms " +
                  ", ".join(f"{c} {v:.2f}" for c, v in part.items()), flush=True)
    import torch

    print(f"\n{' '.join(cpu.split())}; torch threads {torch.get_num_threads()}; batch {args.batch}, prompt "
          f"{args.prompt_tokens}, {args.max_tokens} new tokens, preset {args.preset}, {args.rounds} rounds; median ms "
          f"per full decode step over {', '.join(f'{len(v)} {k}' for k, v in samples.items())} steps")
    both = "stock" in samples and "mikv" in samples
    print(f"{'component':<12}" + "".join(f"{p:>10}" for p in policies) + ("  mikv-stock" if both else ""))
    med = {p: {c: statistics.median(s[c] for s in samples[p]) if samples[p] else float("nan") for c in COMPONENTS}
           for p in policies}
    for c in COMPONENTS:
        row = f"{c:<12}" + "".join(f"{med[p][c]:>10.2f}" for p in policies)
        if both:
            row += f"{med['mikv'][c] - med['stock'][c]:>+11.2f}"
        print(row)
    if both:
        print(f"stock / mikv step time: {med['stock']['step'] / med['mikv']['step']:.2f}x")


if __name__ == "__main__":
    main()
