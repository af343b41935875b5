"""Prefix caching under `vllm serve --kv-cache-policy mikv` (on by default, as in stock vLLM).

Two requests share a ~1k-token document with a pass key in it and ask about it with different
question suffixes, one after the other and concurrently (the second may then hit blocks the first
fills in the same step). The second reports cached prompt tokens and both answer correctly.
"""

from __future__ import annotations

import asyncio
import random
import urllib.request

import pytest
from helpers import ServerError, vllm_server

from mikv_vllm.eval.passkey import is_correct, make_trial

pytestmark = pytest.mark.engine

DOC_TOKENS = 1000
QUESTIONS = ["\n\nWhat is the pass key? The pass key is",
             "\n\nQuestion: which number is the pass key?\nAnswer: the pass key is"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    try:
        with vllm_server(model_dir, "--kv-cache-policy", "mikv", "--max-model-len", "2048",
                         "--enable-prompt-tokens-details", log_dir=tmp_path_factory.mktemp("prefix")) as srv:
            yield srv
    except ServerError as e:
        pytest.fail(str(e), pytrace=False)


def _doc(server, seed):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(server.model))
    trial = make_trial(tok, DOC_TOKENS, 0.4, random.Random(seed))
    doc = trial.prompt[: trial.prompt.rindex("\n\nWhat is the pass key?")]
    return trial, doc


def hits(server) -> float:
    with urllib.request.urlopen(server.url("/metrics"), timeout=30) as r:
        body = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith("vllm:prefix_cache_hits_total"))


def _cached(resp) -> int:
    details = resp.usage.prompt_tokens_details
    return int(details.cached_tokens or 0) if details is not None else 0


def test_prefix_caching_is_on(server):
    log = server.log_path.read_text(errors="replace")
    assert "MiKV: prefix caching on" in log, server.log_tail()


def test_one_after_the_other(server):
    trial, doc = _doc(server, seed=1)
    client = server.openai_client()
    before = hits(server)
    answers = []
    for q in QUESTIONS:
        resp = client.completions.create(model=server.model, prompt=doc + q, max_tokens=12, temperature=0)
        answers.append((resp.choices[0].text, _cached(resp)))
    assert answers[0][1] == 0, answers
    assert answers[1][1] >= 896, answers                  # the document's full blocks came from the cache
    assert hits(server) - before >= 896
    for text, _ in answers:
        assert is_correct(trial, text), (trial.passkey, answers)


def test_concurrent(server):
    import openai

    trial, doc = _doc(server, seed=2)

    async def both():
        client = openai.AsyncOpenAI(base_url=server.url("/v1"), api_key="EMPTY", timeout=600, max_retries=0)
        out = await asyncio.gather(*(client.completions.create(model=server.model, prompt=doc + q, max_tokens=12,
                                                               temperature=0) for q in QUESTIONS))
        await client.close()
        return out

    before = hits(server)
    resps = asyncio.run(both())
    answers = [(r.choices[0].text, _cached(r)) for r in resps]
    print("concurrent:", answers, "hits:", hits(server) - before)
    assert max(c for _, c in answers) > 0 and hits(server) > before, answers
    for text, _ in answers:
        assert is_correct(trial, text), (trial.passkey, answers)
