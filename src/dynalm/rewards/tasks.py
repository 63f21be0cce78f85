"""Task rewards: translation metrics, poem form and theme, and two guards (EOS, length floor).

All functions have TRL's reward shape `fn(prompts, completions, **kwargs) -> list[float]`.
The environment passes the data rows' other fields as keyword lists (translation rows
`{source, reference}` give `reference=[...]`) and `ended=[bool, ...]` (True when the
completion stopped at EOS rather than at the token limit).

Translation (`chrf`, `bleu`, `ter`) use sacrebleu's own metric classes at sentence level:

* `chrf` — chrF (Popović, 2015), sacrebleu's score / 100, in 0..1.
* `bleu` — sentence BLEU with `effective_order=True` (n-gram orders longer than the
  sentence are left out instead of zeroing the score), sacrebleu's score / 100, in 0..1.
* `ter`  — **−TER / 100**, so that higher is better like every other reward: 0 for an exact
  match, −1 when the edits equal the reference length. TER counts edits relative to the
  reference length, so a long, rambling completion can go below −1 (it is not clipped:
  that pressure against run-on output is intended).

A row's `reference` may be one string or a list of strings (several references).
"""

from __future__ import annotations

import functools
import re

from ..errors import UserError
from .text import words

# ----------------------------------------------------------------------------- translation


@functools.lru_cache(maxsize=None)
def _metric(kind: str):
    from sacrebleu.metrics import BLEU, CHRF, TER

    if kind == "chrf":
        return CHRF()
    if kind == "bleu":
        return BLEU(effective_order=True)
    if kind == "ter":
        return TER()
    raise ValueError(kind)


def _references(name: str, n: int, kwargs: dict) -> list[list[str]]:
    """The `reference` kwarg as one list of reference strings per completion, checked."""
    fix = "add a 'reference' field to every row of data.train / data.eval (translation rows are {source, reference})"
    refs = kwargs.get("reference")
    if refs is None:
        raise UserError(f"reward '{name}' needs a 'reference' field in the data rows", fix)
    refs = list(refs)
    if len(refs) != n:
        raise UserError(f"reward '{name}' got {len(refs)} references for {n} completions", "give one reference per row")
    out = []
    for i, r in enumerate(refs):
        if r is None:
            raise UserError(f"reward '{name}' needs a 'reference' field in the data rows (row {i} of the batch has none)", fix)
        out.append([str(x) for x in r] if isinstance(r, (list, tuple)) else [str(r)])
    return out


def _sentence_scores(kind: str, completions, kwargs) -> list[float]:
    refs = _references(kind, len(completions), kwargs)
    metric = _metric(kind)
    return [metric.sentence_score(str(c), r).score for c, r in zip(completions, refs)]


def _unit(score: float) -> float:
    """A 0..100 sacrebleu score as 0..1 (clamped: sacrebleu's float sums can give 100.00000000000004)."""
    return min(1.0, max(0.0, score / 100.0))


def chrf(prompts, completions, **kwargs) -> list[float]:
    """Sentence chrF of each completion against its `reference`, / 100 (0..1, higher is better)."""
    return [_unit(s) for s in _sentence_scores("chrf", completions, kwargs)]


def bleu(prompts, completions, **kwargs) -> list[float]:
    """Sentence BLEU (effective order) against `reference`, / 100 (0..1, higher is better)."""
    return [_unit(s) for s in _sentence_scores("bleu", completions, kwargs)]


def ter(prompts, completions, **kwargs) -> list[float]:
    """−TER / 100 against `reference`: 0 for an exact match, lower (≤ 0, unbounded) for more edits.

    The sign is flipped so that higher is better; give it a positive weight.
    """
    return [0.0 - s / 100.0 for s in _sentence_scores("ter", completions, kwargs)]


# ----------------------------------------------------------------------------- poems


def poem_lines(text: str) -> list[str]:
    """The non-empty lines of a poem, stripped."""
    return [ln.strip() for ln in str(text).splitlines() if ln.strip()]


_LAST_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


def last_word(line: str) -> str | None:
    """The last alphabetic word of a line, lower-cased (trailing punctuation ignored)."""
    found = _LAST_WORD.findall(line)
    return found[-1].lower() if found else None


@functools.lru_cache(maxsize=4096)
def _rhyming_parts(word: str) -> frozenset[str]:
    try:
        import pronouncing
    except ImportError:
        raise UserError("the rhyme reward needs the CMU dictionary via 'pronouncing'", "run: pip install pronouncing") from None
    return frozenset(pronouncing.rhyming_part(p) for p in pronouncing.phones_for_word(word))


def words_rhyme(a: str | None, b: str | None) -> bool:
    """Whether two words rhyme per the CMU dictionary: some pronunciations share the sounds
    from the last stressed vowel on. A word does not rhyme with itself, and words missing
    from the dictionary rhyme with nothing."""
    if not a or not b or a == b:
        return False
    return bool(_rhyming_parts(a) & _rhyming_parts(b))


def _pairs(n: int, scheme: str) -> list[tuple[int, int]]:
    if scheme == "aabb":  # couplets: (1,2), (3,4), ...; an odd last line is left out
        return [(i, i + 1) for i in range(0, n - 1, 2)]
    if scheme == "abab":  # quatrains: (1,3), (2,4), (5,7), (6,8), ...
        return [(i, i + 2) for i in range(n - 2) if i % 4 in (0, 1)]
    raise UserError(f"rhyme scheme '{scheme}' is not known", "use 'aabb', 'abab' or 'best'")


def rhyme_score(text: str, scheme: str = "best") -> float:
    """Share of the scheme's line pairs whose last words rhyme; 0 with fewer than 2 lines."""
    ends = [last_word(ln) for ln in poem_lines(text)]
    if len(ends) < 2:
        return 0.0
    scheme = str(scheme).lower()
    schemes = ("aabb", "abab") if scheme == "best" else (scheme,)
    best = 0.0
    for s in schemes:
        pairs = _pairs(len(ends), s)
        if pairs:
            best = max(best, sum(words_rhyme(ends[i], ends[j]) for i, j in pairs) / len(pairs))
    return best


def rhyme(prompts, completions, scheme: str = "best", **kwargs) -> list[float]:
    """Rhyme of a poem (0..1): the share of rhyming line pairs, lines = non-empty lines.

    `scheme="aabb"` pairs lines as couplets (1–2, 3–4, …; an odd last line is left out),
    `scheme="abab"` as alternate rhymes within quatrains (1–3, 2–4, 5–7, …), and the
    default `"best"` takes the higher of the two, so either form can earn full credit.
    Last words rhyme when the CMU dictionary (via `pronouncing`, offline) gives them the
    same sounds from the last stressed vowel on; a word repeated does not count as a rhyme
    (so the policy cannot win by ending every line on the same word). Fewer than 2 lines → 0.
    """
    return [rhyme_score(c, scheme) for c in completions]


def line_shape_score(text: str, lines: int = 4, min_words: int = 3, max_words: int = 12) -> float:
    """0.5 · line-count closeness + 0.5 · share of lines with min_words..max_words words."""
    got = poem_lines(text)
    if not got:
        return 0.0
    count_score = max(0.0, 1.0 - abs(len(got) - lines) / lines)
    ok = sum(min_words <= len(words(ln)) <= max_words for ln in got)
    return 0.5 * count_score + 0.5 * ok / len(got)


def line_shape(prompts, completions, lines: int = 4, min_words: int = 3, max_words: int = 12, **kwargs) -> list[float]:
    """How close a poem is to the target shape (0..1).

    With n non-empty lines, score = 0.5 · max(0, 1 − |n − lines| / lines)
                                  + 0.5 · (lines having min_words..max_words words) / n,
    and 0 for an empty completion. A 4-line poem of 3–12 words a line scores 1.0.
    """
    if lines < 1 or min_words > max_words:
        raise UserError("line_shape needs lines >= 1 and min_words <= max_words", "fix the reward's kwargs")
    return [line_shape_score(c, lines, min_words, max_words) for c in completions]


def theme_relevance(prompts, completions, **kwargs) -> list[float]:
    """Cosine similarity (−1..1) of all-MiniLM-L6-v2 embeddings of the theme (the row's prompt
    field, e.g. 'a snowy owl') and the poem. An empty poem is embedded as '.'."""
    from . import models

    return models.cosine_pairs([str(p) for p in prompts], [c if str(c).strip() else "." for c in completions])


# ----------------------------------------------------------------------------- guards


def eos(prompts, completions, ended=None, **kwargs) -> list[float]:
    """1.0 if the completion stopped at EOS, else 0.0 (it ran into the token limit).

    Give it a small positive weight as a guard against policies that learn never to stop.
    """
    if ended is None:
        raise UserError("reward 'eos' needs the 'ended' flags", "call it through the environment, which passes ended=[...]")
    ended = list(ended)
    if len(ended) != len(completions):
        raise UserError(f"reward 'eos' got {len(ended)} ended flags for {len(completions)} completions", "give one per completion")
    return [1.0 if bool(e) else 0.0 for e in ended]


def length_floor(prompts, completions, min_words: int = 5, **kwargs) -> list[float]:
    """Penalty against length collapse: 0 with ≥ min_words words, else −(min_words − n) / min_words.

    So −1 for an empty completion, rising linearly to 0 at `min_words`. Use a positive weight.
    """
    if min_words < 1:
        raise UserError("length_floor needs min_words >= 1", "fix the reward's kwargs")
    out = []
    for c in completions:
        n = len(words(str(c)))
        out.append(0.0 if n >= min_words else -(min_words - n) / min_words)
    return out
