"""Robustness of `vllm serve --kv-cache-policy mikv` under load and bad input.

* 32 concurrent requests of mixed lengths with a KV cache small enough to force
  preemption, some aborted mid-stream: every surviving request completes and
  its greedy output equals the same request run alone. Exact equality is
  asserted where the cache is lossless (every token hi, fp32 hi tier), which
  checks the machinery: block reuse, stale-state resets, preemption and
  recompute, aborts. With the lossy ``mikv`` preset, quantization turns the
  last-bit differences of batch-size-dependent CPU GEMMs (harmless for stock
  vLLM) into occasional different codes, so a few greedy continuations may
  diverge; that test asserts completion and reports the agreement.
* Prefix caching is on by default: prompts share filler prefixes, so requests hit blocks that
  concurrent requests fill (in the same step too) and a preempted request is re-admitted with a hit
  on its blocks (read as shared, docs/design.md). The
  lossless test runs with prefix caching on and off (--no-enable-prefix-caching); with it on, a
  cache hit gives exactly the cold run's greedy output.
* A bad --mikv-config exits non-zero with a message naming the field.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import urllib.request

import pytest
from helpers import ServerError, serve_command, vllm_server

pytestmark = pytest.mark.engine

NUM_REQUESTS = 32
ABORT_EVERY = 5          # requests 0, 5, 10, ... are aborted after a few chunks
MAX_TOKENS = 32
NUM_BLOCKS = 10          # x 128 tokens (one is vLLM's null block): far less than 32 concurrent requests need
FILLER = ("Once upon a time in a small village by the sea there lived an old fisherman "
          "who told stories about the stars, the tides and the winds. ")


def _prompts() -> list[str]:
    rng = random.Random(0)
    prompts = []
    for i in range(NUM_REQUESTS):
        reps = rng.choice([1, 3, 8, 16, 24])
        # prompts with the same or more filler share their first blocks: with prefix caching on,
        # concurrent requests hit blocks other requests are still filling or decoding after
        prompts.append(FILLER * reps + f"Story {i}. Question {i}: what did the fisherman say next?")
    return prompts


LOSSLESS = '{"preset": "mikv", "hi_ratio": 1.0, "hi_dtype": "float32"}'


def _start(model_dir, tmp_path_factory, name, mikv_config, *extra):
    return vllm_server(model_dir, "--kv-cache-policy", "mikv", "--mikv-config", mikv_config,
                       "--num-gpu-blocks-override", str(NUM_BLOCKS), "--kv-cache-memory-bytes", str(256 << 20),
                       "--max-model-len", "1024", "--max-num-seqs", "32", *extra,
                       log_dir=tmp_path_factory.mktemp(name))


@pytest.fixture(scope="module", params=["prefix-caching", "no-prefix-caching"])
def lossless_server(request, model_dir, tmp_path_factory):
    extra = ("--no-enable-prefix-caching",) if request.param == "no-prefix-caching" else ()
    try:
        with _start(model_dir, tmp_path_factory, "lossless", LOSSLESS, *extra) as srv:
            srv.prefix_caching = not extra
            yield srv
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="module")
def mikv_server(model_dir, tmp_path_factory):
    try:
        with _start(model_dir, tmp_path_factory, "mikv", "mikv") as srv:
            yield srv
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


async def _run_concurrent(server, prompts):
    import openai

    client = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="EMPTY", timeout=600, max_retries=0)

    async def one(i, prompt):
        stream = await client.completions.create(model=server.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        text, chunks = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            chunks += 1
            if i % ABORT_EVERY == 0 and chunks >= 3:
                await stream.close()  # client disconnect: the server aborts the request
                return i, None
        return i, text

    results = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    await client.close()
    return dict(results)


def _metric(server, name: str) -> float:
    with urllib.request.urlopen(server.url("/metrics"), timeout=30) as r:
        body = r.read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


PREEMPTION_ROUNDS = 3    # whether a round preempts depends on timing (aborts, arrivals): rounds until one does


def _concurrent_vs_alone(server, require_preemption: bool = True):
    """(survivors, preemptions, mismatches) of a concurrent round vs one-at-a-time runs. With
    ``require_preemption`` the concurrent round is repeated (at most PREEMPTION_ROUNDS) until one
    preempts, and that round's survivors are compared."""
    prompts = _prompts()
    for _ in range(PREEMPTION_ROUNDS if require_preemption else 1):
        before = _metric(server, "vllm:num_preemptions_total")
        concurrent = asyncio.run(_run_concurrent(server, prompts))
        preemptions = _metric(server, "vllm:num_preemptions_total") - before
        if preemptions > 0:
            break
    survivors = {i: t for i, t in concurrent.items() if t is not None}
    assert len(survivors) == NUM_REQUESTS - len(range(0, NUM_REQUESTS, ABORT_EVERY))
    assert all(survivors.values()), "a surviving request returned no text"
    if require_preemption:
        assert preemptions > 0, f"no preemption in {PREEMPTION_ROUNDS} concurrent rounds: the KV cache is too large"
    client = server.openai_client()
    mismatches = []
    for i, text in sorted(survivors.items()):
        alone = client.completions.create(model=server.model, prompt=prompts[i], max_tokens=MAX_TOKENS,
                                          temperature=0).choices[0].text
        if alone != text:
            mismatches.append((i, text, alone))
    print(f"preemptions: {preemptions:.0f}, survivors: {len(survivors)}, mismatches: {len(mismatches)}")
    return survivors, preemptions, mismatches


def test_lossless_concurrent_preempted_aborted_match_alone(lossless_server):
    _, _, mismatches = _concurrent_vs_alone(lossless_server)
    assert not mismatches, "\n".join(f"#{i}: concurrent {a!r} != alone {b!r}" for i, a, b in mismatches)
    hits = _metric(lossless_server, "vllm:prefix_cache_hits_total")
    print(f"prefix cache hits: {hits:.0f}")
    assert (hits > 0) == lossless_server.prefix_caching      # the reruns hit the cache iff it is on


def test_lossless_cache_hit_equals_cold_run(lossless_server):
    """(d): with r = 1 a hit reads the prefix's hi copies: exactly the cold run's greedy output."""
    if not lossless_server.prefix_caching:
        pytest.skip("prefix caching off")
    prompt = "A new tale. " + FILLER * 20 + "The fisherman looked at the sky and said"
    client = lossless_server.openai_client()
    before = _metric(lossless_server, "vllm:prefix_cache_hits_total")
    runs = [client.completions.create(model=lossless_server.model, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0).choices[0].text for _ in range(2)]
    assert _metric(lossless_server, "vllm:prefix_cache_hits_total") - before >= 128   # the rerun hit
    assert runs[0] == runs[1], runs


def test_mikv_concurrent_preempted_aborted_complete(mikv_server):
    # Preemption is asserted by the lossless test; here it is likely but timing-dependent.
    # Prefix caching is on (default): the one-at-a-time reruns read their prompts from the cache.
    survivors, _, mismatches = _concurrent_vs_alone(mikv_server, require_preemption=False)
    assert _metric(mikv_server, "vllm:prefix_cache_hits_total") > 0
    for i, a, b in mismatches:
        print(f"  diverged #{i}: concurrent {a!r} / alone {b!r}")
    # Divergence comes from last-bit GEMM differences crossing quantization
    # boundaries (the lossless test above shows the machinery itself is exact) and, with prefix
    # caching, from hits: a request that hits reads the shared prefix as lo copies + sinks while
    # the same request run cold keeps its own hi set over it; a preempted request is re-admitted with
    # a hit on its own blocks, so the count grows with the preemptions, which depend on timing
    # (measured, all plausible continuations: 5 of 25 with the former INT3 r = 0.1 default; with INT4
    # r = 0.03 fp8 hi 7 of 25 at 3 preemptions, 10 of 25 at 7 on CI). It must stay a minority.
    assert 2 * len(mismatches) < len(survivors)


@pytest.mark.parametrize("bad, field", [
    ('{"foo": 1}', "foo"),
    ('{"hi_ratio": 2}', "hi_ratio"),
    ('{"lo_bits": 5}', "lo_bits"),
])
def test_bad_mikv_config_fails_naming_field(model_dir, bad, field):
    cmd = serve_command() + [str(model_dir), "--kv-cache-policy", "mikv", "--mikv-config", bad]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"'{field}'" in proc.stderr, proc.stderr[-2000:]
