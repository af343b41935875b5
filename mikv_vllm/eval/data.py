"""Real English prose for the probes: the Python Language Reference.

Every CPython installation ships the reference manual's prose as
``pydoc_data/topics.py`` (the text ``help("TOPIC")`` prints; written by the
Python documentation authors, PSF license). It is always installed, offline,
and nobody in this project wrote it. :func:`prose_corpus` turns a fixed list of
its topics into running prose: wrapped lines are joined into paragraphs and
headings, underlines, code samples, grammar rules and tables are dropped.

The corpus is split into disjoint regions so that probes never share text:
perplexity windows, needle haystacks and generation-agreement prompts.
"""

from __future__ import annotations

import functools
import hashlib
import re
import sys
from dataclasses import dataclass

# Topics in this order; missing ones (other Python versions) are skipped.
TOPICS = (
    "execmodel", "naming", "import", "exceptions", "assignment", "compound", "types",
    "datamodel", "customization", "specialnames", "attribute-access", "calls", "class",
    "function", "try", "with", "for", "while", "if", "comparisons", "booleans", "lambda",
    "typesseq", "typesmapping", "string-methods", "formatstrings", "floating", "integers",
    "numbers", "objects", "truth", "yield", "raise", "return", "global", "nonlocal", "del",
    "debugger", "context-managers", "sequence-types", "numeric-types", "dynamic-features",
)

_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'\"()\-’“”]")


@dataclass(frozen=True)
class Corpus:
    text: str
    source: str          # file the text came from
    description: str
    sha256: str

    def to_dict(self) -> dict:
        return {"source": self.source, "description": self.description, "sha256": self.sha256,
                "chars": len(self.text), "python": sys.version.split()[0]}


def _is_prose(paragraph: str) -> bool:
    if len(paragraph) < 80:
        return False
    if paragraph.lstrip().startswith(("*", "+", "|", ">>>", "...", "-")):
        return False
    good = len(_PROSE_CHARS.findall(paragraph))
    return good / len(paragraph) >= 0.93


def _clean(topic_text: str) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", topic_text):
        lines = block.split("\n")
        if any(ln.startswith((" ", "\t")) for ln in lines):
            continue  # code samples, grammar, indented notes and tables
        if any(re.fullmatch(r"[=*\-~^]{3,}", ln.strip()) for ln in lines):
            continue  # headings
        para = " ".join(ln.strip() for ln in lines).strip()
        para = para.replace('"', "")  # the topics quote code identifiers with "..."
        if _is_prose(para):
            paragraphs.append(para)
    return paragraphs


@functools.lru_cache(maxsize=1)
def prose_corpus() -> Corpus:
    """The cleaned prose of the Python Language Reference topics (deterministic)."""
    import pydoc_data.topics as topics_mod

    paragraphs: list[str] = []
    for name in TOPICS:
        text = topics_mod.topics.get(name)
        if text:
            paragraphs.extend(_clean(text))
    text = "\n\n".join(paragraphs)
    if len(text) < 50_000:
        raise RuntimeError(f"prose corpus from {topics_mod.__file__} is too small ({len(text)} chars)")
    return Corpus(text=text, source=topics_mod.__file__,
                  description="Python Language Reference topics (pydoc_data/topics.py, PSF), prose paragraphs",
                  sha256=hashlib.sha256(text.encode()).hexdigest()[:16])


class TokenStream:
    """The corpus as one token-id list, cut into regions for the probes."""

    # fractions of the token stream: [start, end)
    REGIONS = {"ppl": (0.0, 0.35), "agreement": (0.35, 0.5), "haystack": (0.5, 1.0)}

    def __init__(self, tokenizer, corpus: Corpus | None = None):
        self.corpus = corpus or prose_corpus()
        self.tokenizer = tokenizer
        self.ids: list[int] = tokenizer.encode(self.corpus.text, add_special_tokens=False)

    def region(self, name: str) -> list[int]:
        a, b = self.REGIONS[name]
        n = len(self.ids)
        return self.ids[int(a * n): int(b * n)]

    def windows(self, name: str, length: int, count: int, stride: int | None = None) -> list[list[int]]:
        """``count`` windows of ``length`` tokens from region ``name`` (non-overlapping if they fit)."""
        ids = self.region(name)
        if length > len(ids):
            raise ValueError(f"region {name!r} has {len(ids)} tokens, need {length}")
        room = len(ids) - length
        if stride is None:
            stride = length if count * length <= len(ids) else max(1, room // max(1, count - 1))
        return [ids[(i * stride) % (room + 1): (i * stride) % (room + 1) + length] for i in range(count)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)
