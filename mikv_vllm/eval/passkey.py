"""Passkey retrieval probe (Mohtashami & Jaggi, 2023): a number hidden in filler text."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again. ")
INTRO = ("There is an important pass key hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about the pass key.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


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


def is_correct(trial: PasskeyTrial, completion: str) -> bool:
    found = re.findall(r"\d+", completion)
    return bool(found) and found[0] == trial.passkey
