"""Retrieval probes: passkey (Mohtashami & Jaggi, 2023) and a needle in real prose.

* passkey: a 5-digit number hidden in repetitive filler text, asked for at the end.
* needle: a "special magic number" sentence inserted at a given depth of a
  haystack of real English prose (:mod:`mikv_vllm.eval.data`).

Both are plain-text completion prompts (no chat template); a trial is correct
when the first number in the greedy completion equals the hidden one.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"

NEEDLE_INTRO = "Read the following text carefully. A special magic number is hidden in it.\n\n"
NEEDLE = " The special magic number is {n}. Remember the special magic number: {n}. "
NEEDLE_QUESTION = "\n\nWhat is the special magic number mentioned in the text above? The special magic number is"


@dataclass(frozen=True)
class PasskeyTrial:
    prompt: str
    passkey: str
    depth: float


def make_trial(tokenizer, target_tokens: int, depth: float, rng: random.Random) -> PasskeyTrial:
    """A prompt of about ``target_tokens`` tokens with the needle at ``depth`` (0..1)."""
    passkey = str(rng.randint(10000, 99999))
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    fixed = len(tokenizer.encode(INTRO + needle + QUESTION))
    per_filler = len(tokenizer.encode(FILLER * 10)) / 10
    n_fill = max(1, int((target_tokens - fixed) / per_filler))
    before = int(round(n_fill * depth))
    prompt = INTRO + FILLER * before + needle + FILLER * (n_fill - before) + QUESTION
    return PasskeyTrial(prompt, passkey, depth)


def make_trials(tokenizer, target_tokens: int, n: int, seed: int = 0) -> list[PasskeyTrial]:
    """``n`` trials with depths spread evenly over [0.05, 0.95]."""
    rng = random.Random(seed)
    depths = [0.05 + 0.9 * i / max(1, n - 1) for i in range(n)]
    return [make_trial(tokenizer, target_tokens, d, rng) for d in depths]


def make_needle_trial(tokenizer, haystack_ids: list[int], target_tokens: int, depth: float,
                      rng: random.Random) -> PasskeyTrial:
    """Needle sentence at ``depth`` of a prose haystack cut from ``haystack_ids``
    so that the prompt has about ``target_tokens`` tokens."""
    number = str(rng.randint(10000, 99999))
    needle = NEEDLE.format(n=number)
    fixed = len(tokenizer.encode(NEEDLE_INTRO + needle + NEEDLE_QUESTION))
    n_hay = max(16, target_tokens - fixed)
    hay = haystack_ids[:n_hay]
    cut = int(round(len(hay) * depth))
    before = tokenizer.decode(hay[:cut])
    after = tokenizer.decode(hay[cut:])
    # end the "before" part at a sentence boundary when one is close, so the needle reads naturally
    dot = before.rfind(". ")
    if dot > len(before) - 200 and dot > 0:
        after = before[dot + 1:] + after
        before = before[:dot + 1]
    prompt = NEEDLE_INTRO + before + needle + after.lstrip() + NEEDLE_QUESTION
    return PasskeyTrial(prompt, number, depth)


def is_correct(trial: PasskeyTrial, completion: str) -> bool:
    found = re.findall(r"\d+", completion)
    return bool(found) and found[0] == trial.passkey
