"""Quality with prefix-cache hits: passkey with the key inside a shared prefix, and perplexity after a
shared prefix, prefix caching on (the second request reads the prefix from the cache) vs off.

Per config one offline engine (chunked prefill, ``--chunk`` tokens per step):

* passkey: per trial a ~``--passkey-tokens`` document with a pass key; request 1 = document +
  question 1 (fills the cache), request 2 = document + question 2 (a hit when caching is on).
  Scored: request 2's answers.
* ppl: one ``--ppl-tokens`` prose window; request 1 = its first ``--prefix`` tokens (fills the
  cache), then per scored position p > prefix (``--ppl-points`` of them, evenly spaced) a request
  ``ids[:p]`` whose forced next token's raw logprob is read (vLLM returns no prompt logprobs for
  cached positions); with caching on, every such request reads its cached blocks as a reader.

    python benchmarks/prefix_quality.py [--configs stock:on,mikv:on,mikv:off]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time

QUESTION_2 = "\n\nQuestion: which number is the pass key?\nAnswer: the pass key is"


def run(model: str, policy: str | None, caching: bool, args) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from mikv_vllm.eval.data import TokenStream
    from mikv_vllm.eval.engine import offline_engine
    from mikv_vllm.eval.passkey import QUESTION, is_correct, make_trial

    t0 = time.time()
    with offline_engine(model, policy, enable_prefix_caching=caching, enable_chunked_prefill=True,
                        max_num_batched_tokens=args.chunk, max_num_seqs=1) as llm:
        tok = llm.get_tokenizer()
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        rng = random.Random(0)
        correct = 0
        for i in range(args.trials):
            trial = make_trial(tok, args.passkey_tokens, 0.05 + 0.9 * i / max(1, args.trials - 1), rng)
            doc = trial.prompt[: trial.prompt.rindex(QUESTION)]
            llm.generate([doc + QUESTION], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
            out = llm.generate([doc + QUESTION_2], greedy, use_tqdm=False)[0]
            correct += is_correct(trial, out.outputs[0].text)
            cached = out.num_cached_tokens or 0
        print(json.dumps({"policy": policy or "stock", "prefix_caching": caching,
                          "passkey": f"{correct}/{args.trials}"}), flush=True)
        # perplexity at sampled positions p > prefix: request ids[:p], the true next token forced
        # (allowed_token_ids) and its raw logprob read (vLLM cannot return prompt logprobs of a hit)
        ids = TokenStream(tok).windows("ppl", args.ppl_tokens, 1)[0]
        llm.generate([TokensPrompt(prompt_token_ids=ids[: args.prefix])], SamplingParams(max_tokens=1),
                     use_tqdm=False)
        stride = max(1, (len(ids) - args.prefix - 1) // args.ppl_points)
        nll, cached_ppl = [], 0
        for p in range(args.prefix + 1, len(ids), stride):
            out = llm.generate([TokensPrompt(prompt_token_ids=ids[:p])],
                               SamplingParams(max_tokens=1, temperature=0.0, logprobs=0, allowed_token_ids=[ids[p]]),
                               use_tqdm=False)[0]
            nll.append(-out.outputs[0].logprobs[0][ids[p]].logprob)
            cached_ppl = max(cached_ppl, out.num_cached_tokens or 0)
        return {"policy": policy or "stock", "prefix_caching": caching, "passkey": f"{correct}/{args.trials}",
                "passkey_cached_tokens_last": cached, "ppl_cached_tokens": cached_ppl, "ppl_points": len(nll),
                "ppl": math.exp(sum(nll) / len(nll)), "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--configs", default="stock:on,mikv:on,mikv:off")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--passkey-tokens", type=int, default=1000)
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--prefix", type=int, default=512)
    ap.add_argument("--ppl-points", type=int, default=24, help="scored positions after the prefix")
    ap.add_argument("--chunk", type=int, default=128)
    args = ap.parse_args()
    model = args.model
    if model is None:
        from mikv_vllm.model import prepare_model

        model = str(prepare_model(progress=False))
    rows = []
    for spec in args.configs.split(","):
        name, mode = spec.split(":")
        rows.append(run(model, None if name == "stock" else name, mode == "on", args))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| policy | prefix caching | passkey (key in the shared ~{args.passkey_tokens}-token prefix) "
          f"| PPL after a shared {args.prefix}-token prefix ({rows[0]['ppl_points']} positions) "
          "| max cached tokens (ppl) |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['policy']} | {'on (hit)' if r['prefix_caching'] else 'off'} | {r['passkey']} "
              f"| {r['ppl']:.3f} | {r['ppl_cached_tokens']} |")


if __name__ == "__main__":
    main()
