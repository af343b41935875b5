"""Tensor parallelism with MiKV: vLLM's own multiprocess executor, TP = 3 on CPU.

The embedded model has 9 query and 3 KV heads, so TP = 3 puts one KV head (and
its MiKV pages) on each rank. Three engines, one after the other:

* TP = 1 and TP = 3 with a lossless config (r = 1, fp32 hi tier): equal greedy
  outputs, every rank answers ``collective_rpc("mikv_stats")`` with its own head,
  and the /mikv/stats aggregation of the three ranks equals the TP = 1 numbers;
* TP = 3 with the default ``mikv`` preset: the passkey probe still passes.

vLLM-CPU binds each worker's OpenMP threads to a NUMA node by default and refuses
to start more workers than nodes; the test binds them by hand
(``VLLM_CPU_OMP_THREADS_BIND``, one core per rank, cores reused when there are
fewer). TP sizes that cannot split the KV heads are checked at config time, without
an engine.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from mikv_vllm.eval.engine import engine_kwargs, offline_engine
from mikv_vllm.eval.passkey import is_correct, make_trials

TP = 3
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three uses of copper:\n1.",
]
GEN_TOKENS = 24
PASSKEY_TOKENS = 1000
PASSKEY_TRIALS = 10
LOSSLESS = {"preset": "mikv", "hi_ratio": 1.0, "hi_dtype": "float32"}
# aggregated fields that must not depend on how the model is sharded
SHARD_INVARIANT = ("num_kv_heads", "num_layers", "sampled_layers", "tokens_stored", "prefill_tokens",
                   "decode_tokens", "promoted", "demoted")
# cumulative (token, KV head) counters: each rank holds a third. hi_tokens / seen_tokens describe
# the last step only, and which requests that step held depends on scheduling (the multiprocess
# executor schedules asynchronously), so they are compared within the TP run only.
PAIRS = ("promoted", "demoted")
# the shared fixture starts 3 engines (~3.5 min on 2 idle cores, 8 min on a loaded box); its
# time is charged to the first test, so the engine tests get more than the suite's 900 s
ENGINE_TIMEOUT_S = 1800


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _thread_bind(n: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` value: one core per rank, reusing cores if there are fewer."""
    cpus = sorted(os.sched_getaffinity(0))
    return "|".join(str(cpus[i % len(cpus)]) for i in range(n))


def _greedy(llm, prompts, max_tokens):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs]


@pytest.fixture(scope="module")
def results(model_dir):
    import torch

    from mikv_vllm.vllm_glue.endpoints import aggregate

    if not _on_cpu() and torch.cuda.device_count() < TP:
        pytest.skip(f"needs the CPU build or {TP} GPUs")
    res = {}
    with offline_engine(model_dir, "mikv", LOSSLESS) as llm:
        res["tp1_ids"], res["tp1_text"] = _greedy(llm, PROMPTS, GEN_TOKENS)
        res["tp1_workers"] = llm.collective_rpc("mikv_stats")
        res["trials"] = make_trials(llm.get_tokenizer(), PASSKEY_TOKENS, PASSKEY_TRIALS, seed=1)
    with pytest.MonkeyPatch.context() as env:
        if _on_cpu():
            env.setenv("VLLM_CPU_OMP_THREADS_BIND", _thread_bind(TP))
        with offline_engine(model_dir, "mikv", LOSSLESS, tensor_parallel_size=TP) as llm:
            res["tp3_ids"], res["tp3_text"] = _greedy(llm, PROMPTS, GEN_TOKENS)
            res["tp3_workers"] = llm.collective_rpc("mikv_stats")
        with offline_engine(model_dir, "mikv", tensor_parallel_size=TP) as llm:
            _, res["passkey"] = _greedy(llm, [t.prompt for t in res["trials"]], 8)
            res["passkey_workers"] = llm.collective_rpc("mikv_stats")
    for key in ("tp1", "tp3", "passkey"):
        res[key + "_stats"] = aggregate(res[key + "_workers"])
    return res


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_tp3_lossless_equals_tp1(results):
    for prompt, a, b, ta, tb in zip(PROMPTS, results["tp1_ids"], results["tp3_ids"],
                                     results["tp1_text"], results["tp3_text"]):
        assert len(a) == GEN_TOKENS, f"prompt {prompt!r}: TP=1 stopped early ({ta!r}); pick another prompt"
        assert a == b, f"prompt {prompt!r}: TP=1 {ta!r} != TP={TP} {tb!r}"


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_tp3_stats_report_every_rank_and_sum(results):
    (tp1,), workers = results["tp1_workers"], results["tp3_workers"]
    assert sorted(w["rank"] for w in workers) == list(range(TP))
    assert sorted(w["tp_rank"] for w in workers) == list(range(TP))
    for w in workers:
        assert w["enabled"] and w["tp_size"] == TP and w["kv_head_replicas"] == 1, w
        assert w["num_kv_heads"] * TP == tp1["num_kv_heads"] == 3
        assert w["num_layers"] == tp1["num_layers"] and w["sampled_layers"] == tp1["sampled_layers"] == 1
        assert w["tokens_stored"] == tp1["tokens_stored"] > 0
        # r = 1: every pair of the last step is hi, and all ranks saw the same step
        assert w["hi_tokens"] == w["seen_tokens"] == workers[0]["seen_tokens"] > 0
        for key in PAIRS:
            assert w[key] * TP == tp1[key], (key, w[key], tp1[key])
    one, three = results["tp1_stats"], results["tp3_stats"]
    assert three["num_workers"] == TP and three["tensor_parallel_size"] == TP and len(three["workers"]) == TP
    for key in SHARD_INVARIANT:
        assert three[key] == one[key], (key, three[key], one[key])
    assert three["hi_tokens"] == three["seen_tokens"] == TP * workers[0]["seen_tokens"]
    assert three["hi_occupancy"] == one["hi_occupancy"] == 1.0
    assert three["bytes_per_token_per_head"] == one["bytes_per_token_per_head"]


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_tp3_default_preset_passkey(results):
    from mikv_vllm.config import preset

    trials = results["trials"]
    found = sum(is_correct(t, o) for t, o in zip(trials, results["passkey"]))
    print(f"passkey@{PASSKEY_TOKENS} TP={TP} mikv: {found}/{len(trials)}")
    assert found >= len(trials) - 1, f"TP={TP} mikv {found}/{len(trials)}: {results['passkey']}"
    stats = results["passkey_stats"]
    assert stats["num_workers"] == TP and stats["num_kv_heads"] == 3 and stats["preset"] == "mikv"
    assert all(w["seen_tokens"] > 0 and 0 < w["hi_tokens"] < w["seen_tokens"] for w in stats["workers"])
    assert stats["hi_tokens"] == sum(w["hi_tokens"] for w in stats["workers"])
    assert 0 < stats["hi_occupancy"] <= preset("mikv").hi_ratio


# ------------------------------------------------------------- config time
def _create_config(model, **kwargs):
    import mikv_vllm.plugin
    from vllm.engine.arg_utils import EngineArgs

    mikv_vllm.plugin.register()
    return EngineArgs(model=str(model), **kwargs).create_engine_config()


def test_tp_not_dividing_attention_heads_fails_at_config(model_dir):
    """TP = 2 on 9 heads: vLLM's own check, before any process starts."""
    with pytest.raises(ValueError, match=r"attention heads \(9\) must be divisible by tensor parallel size \(2\)"):
        _create_config(model_dir, **engine_kwargs("mikv", tensor_parallel_size=2))


def test_tp_not_splitting_kv_heads_fails_at_config(model_dir, tmp_path):
    """12 query / 6 KV heads at TP = 4: vLLM's config check passes (its workers would
    die on a bare AssertionError); MiKV refuses at config time, naming the sizes that work."""
    from mikv_vllm.vllm_glue.engine_config import MiKVUnsupportedError

    for name in os.listdir(model_dir):  # the tokenizer and config, no weights
        if name.endswith((".json", ".jinja")):
            shutil.copy(model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(num_attention_heads=12, num_key_value_heads=6, head_dim=48)
    (tmp_path / "config.json").write_text(json.dumps(config))
    stock = _create_config(tmp_path, **engine_kwargs(None, tensor_parallel_size=4))
    assert stock.parallel_config.tensor_parallel_size == 4
    with pytest.raises(MiKVUnsupportedError, match=r"--tensor-parallel-size 4 cannot split the model's 6 KV heads"
                                                   r".*valid sizes for this model: \[1, 2, 3, 6, 12\]"):
        _create_config(tmp_path, **engine_kwargs("mikv", tensor_parallel_size=4))
    assert _create_config(tmp_path, **engine_kwargs("mikv", tensor_parallel_size=12))  # 2 ranks per KV head


def test_worker_without_the_mikv_layout_is_refused():
    """A node started without the MiKV flags (its own `vllm serve --headless` command line)
    would hold stock pages for its layers; the engine refuses once the workers report specs."""
    from dataclasses import replace

    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from mikv_vllm.config import preset
    from mikv_vllm.core.layout import RegionLayout
    from mikv_vllm.vllm_glue.engine_config import MiKVUnsupportedError, check_worker_specs

    config = preset("mikv")
    stock = FullAttentionSpec(block_size=128, num_kv_heads=1, head_size=64, dtype=torch.float32)
    mikv = replace(stock, state_content_bytes=RegionLayout.build(config, 128, 64).content_bytes)
    int4 = replace(stock, state_content_bytes=RegionLayout.build(preset("mikv-int4"), 128, 64).content_bytes)
    check_worker_specs(config, [{"layers.0": mikv}, {"layers.1": mikv}])   # two pipeline stages
    want = mikv.state_content_bytes
    with pytest.raises(MiKVUnsupportedError, match=r"1 of 2 workers hold another KV cache layout "
                                                   rf"\(worker 1 layers.1: None B/token/head, MiKV mikv needs {want}\)"):
        check_worker_specs(config, [{"layers.0": mikv}, {"layers.1": stock}])
    other = int4.state_content_bytes
    with pytest.raises(MiKVUnsupportedError, match=rf"worker 0 layers.0: {other} B/token/head.*same --kv-cache-policy"):
        check_worker_specs(config, [{"layers.0": int4}, {"layers.1": mikv}])
