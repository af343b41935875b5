"""The probes every engine of the benchmark runs, as one deterministic workload.

Probes (all greedy, fixed seeds, identical prompts for every config):

* ``passkey``   - passkey retrieval at each length in ``passkey_lengths``,
  ``passkey_trials`` trials with depths spread over [0.05, 0.95].
* ``needle``    - a number hidden in real prose at each depth in ``needle_depths``
  (``needle_trials`` haystacks per depth) at ``needle_length`` tokens.
* ``agreement`` - greedy continuation (``agree_tokens`` tokens, EOS ignored) of
  ``agree_prompts`` prose prompts of ``agree_prompt_len`` tokens; compared with
  the full cache's tokens in the report.
* ``ppl``       - prompt log-probs of ``ppl_windows`` prose windows of
  ``ppl_length`` tokens, prefilled in chunks of ``ppl_chunk`` tokens so every
  chunk after the first attends to the compressed cache. NLL is summed over
  positions ``>= ppl_chunk`` (the first chunk is exact for every config).
  Inside a chunk, queries see the chunk's own K/V uncompressed, so the chunk is
  kept small (16): close to decode, where only the new token is raw.
* ``ppl_decode`` - teacher-forced decode perplexity (the reference simulation's regime): the
  first ``decode_windows`` of the same windows, their first ``decode_prefix`` share prefilled in
  one piece (full precision), then every remaining token forced through one decode step each
  (:mod:`.forcing`); NLL over the decode steps after the first (the first token's log-prob comes
  from the exact prefill).

Retrieval and agreement prompts are prefilled in one piece (full precision,
as in the paper's setting): the compressed cache is what the decode steps read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from . import passkey as pk
from .data import TokenStream

HARNESS_VERSION = 1  # bump when a probe changes: cached results of older versions are rerun
RETRIEVAL_MAX_TOKENS = 6  # " " + 5 digits: the answer is complete after 6 tokens


@dataclass(frozen=True)
class Workload:
    passkey_lengths: tuple[int, ...] = (512, 1024, 2048)
    passkey_trials: int = 20
    needle_length: int = 1024
    needle_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    needle_trials: int = 4
    ppl_windows: int = 2
    ppl_length: int = 1024
    ppl_chunk: int = 16
    agree_prompts: int = 8
    agree_prompt_len: int = 256
    agree_tokens: int = 64
    decode_windows: int = 2
    decode_prefix: float = 0.75
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.decode_prefix < 1:
            raise ValueError(f"decode_prefix must be in (0, 1), got {self.decode_prefix}")
        counts = ("passkey_trials", "needle_trials", "ppl_windows", "agree_prompts", "decode_windows")
        bad = [n for n in counts if getattr(self, n) < 0]
        if bad:
            raise ValueError(f"{', '.join(bad)} must be >= 0")
        if (self.ppl_windows or self.decode_windows) and self.ppl_length < 4:
            raise ValueError(f"ppl_length must be >= 4, got {self.ppl_length}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Workload":
        known = {f.name for f in dataclasses.fields(cls)}
        vals = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**vals)

    def replace(self, **changes: Any) -> "Workload":
        return dataclasses.replace(self, **changes)

    def digest(self) -> str:
        doc = {**self.to_dict(), "harness": HARNESS_VERSION, "retrieval_max_tokens": RETRIEVAL_MAX_TOKENS}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def max_prompt_tokens(self) -> int:
        lens = [*self.passkey_lengths, self.needle_length if self.needle_trials else 0,
                self.ppl_length if self.ppl_windows else 0, self.agree_prompt_len if self.agree_prompts else 0]
        return max(lens) + 64  # passkey prompts are "about" their length

    def num_requests(self) -> int:
        return (len(self.passkey_lengths) * self.passkey_trials + len(self.needle_depths) * self.needle_trials
                + self.ppl_windows + self.agree_prompts + self.decode_windows)

    def decode_split(self) -> int:
        """Prompt length of a decode-perplexity window (the rest is forced through decode steps)."""
        return max(1, min(self.ppl_length - 2, int(self.decode_prefix * self.ppl_length)))

    def cost_units(self) -> float:
        """Rough relative cost (prefill ~ L^2, decode ~ L * tokens), for ETA and progress."""
        return sum(self.request_costs())

    def request_costs(self) -> list[float]:
        c = []
        for L in self.passkey_lengths:
            c += [_cost(L, RETRIEVAL_MAX_TOKENS)] * self.passkey_trials
        c += [_cost(self.needle_length, RETRIEVAL_MAX_TOKENS)] * (len(self.needle_depths) * self.needle_trials)
        c += [_cost(self.agree_prompt_len, self.agree_tokens)] * self.agree_prompts
        c += [_cost(self.ppl_length, 0) * 1.3] * self.ppl_windows
        c += [_cost(self.decode_split(), self.ppl_length - self.decode_split())] * self.decode_windows
        return c


def _cost(prompt_len: int, new_tokens: int) -> float:
    k = prompt_len / 1024
    return k * k + 0.04 * k * new_tokens + 0.02 * new_tokens + 0.05


# ------------------------------------------------------------------ requests
@dataclass
class Request:
    """One engine request of the workload."""

    rid: str
    probe: str                  # passkey | needle | agreement | ppl | ppl_decode
    cell: str                   # passkey: length; needle: depth; others: index
    prompt: Any                 # str or {"prompt_token_ids": [...]}
    max_tokens: int
    prompt_logprobs: bool = False
    ignore_eos: bool = False
    answer: str | None = None
    depth: float | None = None
    num_prompt_tokens: int = 0
    cost: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    forced: list[int] | None = None   # ppl_decode: the tokens each output step must emit


def build_requests(workload: Workload, tokenizer, stream: TokenStream | None = None) -> list[Request]:
    """All requests of ``workload`` (deterministic for a tokenizer)."""
    w = workload
    out: list[Request] = []
    for L in w.passkey_lengths:
        for i, t in enumerate(pk.make_trials(tokenizer, L, w.passkey_trials, seed=w.seed * 1000 + L)):
            n = len(tokenizer.encode(t.prompt))
            out.append(Request(f"passkey-{L}-{i}", "passkey", str(L), t.prompt, RETRIEVAL_MAX_TOKENS,
                               answer=t.passkey, depth=round(t.depth, 4), num_prompt_tokens=n,
                               cost=_cost(n, RETRIEVAL_MAX_TOKENS)))
    need_stream = (w.needle_trials and w.needle_depths) or w.ppl_windows or w.agree_prompts or w.decode_windows
    if need_stream and stream is None:
        stream = TokenStream(tokenizer)
    if w.needle_trials and w.needle_depths:
        hay = stream.region("haystack")
        count = len(w.needle_depths) * w.needle_trials
        room = max(1, len(hay) - w.needle_length)
        rng = random.Random(w.seed * 1000 + 7)
        k = 0
        for d in w.needle_depths:
            for j in range(w.needle_trials):
                start = (k * room // max(1, count)) % room
                t = pk.make_needle_trial(tokenizer, hay[start:], w.needle_length, d, rng)
                n = len(tokenizer.encode(t.prompt))
                out.append(Request(f"needle-{d}-{j}", "needle", f"{d:g}", t.prompt, RETRIEVAL_MAX_TOKENS,
                                   answer=t.passkey, depth=d, num_prompt_tokens=n,
                                   cost=_cost(n, RETRIEVAL_MAX_TOKENS), meta={"haystack_start": start}))
                k += 1
    if w.agree_prompts:
        for i, ids in enumerate(stream.windows("agreement", w.agree_prompt_len, w.agree_prompts)):
            out.append(Request(f"agreement-{i}", "agreement", str(i), {"prompt_token_ids": ids},
                               w.agree_tokens, ignore_eos=True, num_prompt_tokens=len(ids),
                               cost=_cost(len(ids), w.agree_tokens)))
    if w.ppl_windows:
        for i, ids in enumerate(stream.windows("ppl", w.ppl_length, w.ppl_windows)):
            out.append(Request(f"ppl-{i}", "ppl", str(i), {"prompt_token_ids": ids}, 1, prompt_logprobs=True,
                               num_prompt_tokens=len(ids), cost=_cost(len(ids), 0) * 1.3,
                               meta={"skip": w.ppl_chunk}))
    if w.decode_windows:
        split = w.decode_split()
        for i, ids in enumerate(stream.windows("ppl", w.ppl_length, w.decode_windows)):
            out.append(Request(f"ppl_decode-{i}", "ppl_decode", str(i), {"prompt_token_ids": ids[:split]},
                               len(ids) - split, ignore_eos=True, num_prompt_tokens=split,
                               cost=_cost(split, len(ids) - split), forced=list(ids[split:])))
    return out


def score_request(req: Request, output) -> dict[str, Any]:
    """Per-request record from a vLLM ``RequestOutput``."""
    comp = output.outputs[0]
    rec: dict[str, Any] = {"id": req.rid, "cell": req.cell, "prompt_tokens": req.num_prompt_tokens}
    if req.probe in ("passkey", "needle"):
        trial = pk.PasskeyTrial("", req.answer, req.depth or 0.0)
        rec.update(depth=req.depth, answer=req.answer, completion=comp.text,
                   correct=pk.is_correct(trial, comp.text))
    elif req.probe == "agreement":
        rec.update(tokens=list(comp.token_ids), text=comp.text)
    elif req.probe == "ppl":
        ids = req.prompt["prompt_token_ids"]
        lps = output.prompt_logprobs or []
        skip = max(1, int(req.meta.get("skip", 0)))
        nll, n = 0.0, 0
        for pos in range(skip, len(ids)):
            d = lps[pos] if pos < len(lps) else None
            if not d:
                continue
            lp = d.get(ids[pos]) if hasattr(d, "get") else None
            if lp is None:
                continue
            nll -= float(lp.logprob)
            n += 1
        rec.update(nll=nll, tokens=n, skip=skip)
    elif req.probe == "ppl_decode":
        got, lps = list(comp.token_ids), comp.logprobs or []
        if got != req.forced:
            raise RuntimeError(f"{req.rid}: forced decode emitted other tokens than forced (logits processor off?)")
        nll = -sum(float(lps[i][t].logprob) for i, t in enumerate(got) if i >= 1)
        rec.update(nll=nll, tokens=len(got) - 1, prefix=req.num_prompt_tokens)
    return rec
