"""Lexical reward functions and metrics: distinct-n, novelty, repetition, length.

Each takes `prompts` and `completions` (lists of str) plus keyword extras, and returns one
float per completion — TRL's reward-function shape, so users' functions drop in.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"\w+(?:'\w+)?", re.UNICODE)

# A short English stop-word list: "content words" are the rest.
STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from as is are was were be been being
    it its it's this that these those he she they we you i me him her them us my your his their our
    not no do does did have has had will would can could shall should may might must there here
    what which who whom when where why how all any each some such than too very just also into over
    under up down out off about again once only own same other more most both few nor""".split()
)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n_one(text: str, n: int) -> float:
    """Unique n-grams / all n-grams of one text (0 when it has none)."""
    grams = ngrams(words(text), n)
    return len(set(grams)) / len(grams) if grams else 0.0


def distinct_n_corpus(texts: list[str], n: int) -> float:
    """Corpus-level distinct-n (Li et al., 2016): unique n-grams over all texts / all n-grams."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram of the same text."""
    grams = ngrams(words(text), n)
    if not grams:
        return 0.0
    seen, rep = set(), 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    return rep / len(grams)


def novelty_one(prompt: str, completion: str) -> float:
    """Share of the completion's content words that do not occur in the prompt."""
    content = [w for w in words(completion) if w not in STOPWORDS]
    if not content:
        return 0.0
    seen = set(words(prompt))
    return sum(w not in seen for w in content) / len(content)


def copied_spans(prompt: str, completion: str, n: int = 4) -> tuple[list[str], list[bool]]:
    """The completion's words, and for each whether it lies inside an n-gram that also
    occurs in the prompt (so a restated phrase is marked word by word)."""
    ws = words(completion)
    seen = set(ngrams(words(prompt), n))
    mark = [False] * len(ws)
    for i, g in enumerate(ngrams(ws, n)):
        if g in seen:
            for j in range(i, i + n):
                mark[j] = True
    return ws, mark


def copy_share(prompt: str, completion: str, n: int = 4) -> float:
    """Share of the completion's words that sit in an n-gram copied from the prompt."""
    ws, mark = copied_spans(prompt, completion, n)
    return sum(mark) / len(ws) if ws else 0.0


def uncopied_text(prompt: str, completion: str, n: int = 4) -> str:
    """The completion without the words of n-grams copied from the prompt."""
    ws, mark = copied_spans(prompt, completion, n)
    return " ".join(w for w, m in zip(ws, mark) if not m)


# ----------------------------------------------------------------------------- reward functions


def copy(prompts, completions, n: int = 4, **kwargs) -> list[float]:
    """Share of the completion's words inside an n-gram (default 4-gram) reproduced from the
    prompt: 1 for a restatement of the opening, ~0 for a continuation. Give it a negative
    weight as a penalty on buying relatedness by copying."""
    return [copy_share(p, c, n) for p, c in zip(prompts, completions)]


def distinct1(prompts, completions, **kwargs) -> list[float]:
    """Distinct-1 of each completion: unique words / words."""
    return [distinct_n_one(c, 1) for c in completions]


def distinct2(prompts, completions, **kwargs) -> list[float]:
    """Distinct-2 of each completion: unique bigrams / bigrams (lexical diversity)."""
    return [distinct_n_one(c, 2) for c in completions]


def novelty(prompts, completions, **kwargs) -> list[float]:
    """Share of content words in the completion that are new relative to the prompt."""
    return [novelty_one(p, c) for p, c in zip(prompts, completions)]


def repetition(prompts, completions, n: int = 3, **kwargs) -> list[float]:
    """Share of repeated n-grams (default trigrams); give it a negative weight as a penalty."""
    return [repeated_ngram_share(c, n) for c in completions]


def length(prompts, completions, target: int | None = None, **kwargs) -> list[float]:
    """Word count; with `target`, 1 − |len − target| / target, floored at 0."""
    counts = [len(words(c)) for c in completions]
    if target is None:
        return [float(c) for c in counts]
    return [max(0.0, 1.0 - abs(c - target) / target) for c in counts]


def mentions(prompts, completions, words: list[str] | None = None, **kwargs) -> list[float]:
    """1 when the completion contains one of `words` (whole words, any case), else 0: a
    sparse reward, e.g. "name an animal", for testing how an algorithm copes with prompt
    groups that all score 0. Give the list as `kwargs: {words: [...]}`."""
    if not words:
        raise ValueError("mentions needs kwargs: {words: [...]}")
    wanted = {w.lower() for w in words}
    return [1.0 if wanted & set(_WORD.findall(c.lower())) else 0.0 for c in completions]
