"""Stock-vLLM baseline smoke: `vllm serve` of the prepared model (no MiKV flags, float32).

One server for the module (~40 s start on 2 CPU cores with --enforce-eager),
queried through the `openai` client. If this fails, nothing MiKV-specific is to
blame: the model, vLLM or the environment is.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.engine

VLLM_SERVER_ARGS: list[str] = []  # stock: no --kv-cache-policy

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(vllm_server):
    return vllm_server.openai_client()


def test_health_and_models(vllm_server):
    status, _ = vllm_server.get("/health")
    assert status == 200
    status, body = vllm_server.get("/v1/models")
    assert status == 200
    ids = [m["id"] for m in json.loads(body)["data"]]
    assert vllm_server.model in ids


def test_completion(client, vllm_server):
    r = client.completions.create(
        model=vllm_server.model, prompt="The capital of France is", max_tokens=8, temperature=0.0
    )
    text = r.choices[0].text
    assert "Paris" in text, text
    assert r.usage.completion_tokens <= 8


def test_chat(client, vllm_server):
    r = client.chat.completions.create(
        model=vllm_server.model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0.0,
    )
    answer = r.choices[0].message.content
    assert "Paris" in answer, answer
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_matches(client, vllm_server):
    kwargs = dict(
        model=vllm_server.model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0.0,
    )
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices
    ]
    assert "".join(pieces) == full


def test_batch_of_prompts(client, vllm_server):
    prompts = ["The capital of France is", "The capital of Germany is", "1, 2, 3, 4,"]
    r = client.completions.create(model=vllm_server.model, prompt=prompts, max_tokens=6, temperature=0.0)
    texts = {c.index: c.text for c in r.choices}
    assert len(texts) == 3
    assert "Paris" in texts[0]
    assert "Berlin" in texts[1]
    assert "5" in texts[2]
