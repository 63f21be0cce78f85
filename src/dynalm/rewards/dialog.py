"""Turn rewards for the multi-turn dialog environment (envs/dialog.py).

After each assistant turn the environment calls the configured reward functions once,
with the usual shape `fn(prompts, completions, **kwargs) -> list[float]` where

  prompts            the user's message the assistant was answering (its last message)
  completions        the assistant's reply (this turn)
  user_reply         the simulated user's next message, written after seeing the reply
  assistant_history  the assistant's earlier turns in the same episode (a list per episode)
  turn               the turn index, 0-based
  ended              whether the reply ended at EOS rather than the token limit
  + the row's other fields (persona, goal, ...)

so any single-turn reward (length, distinct2, sentiment, a user's file) also scores the
assistant's reply. The functions here are registered as built-ins in rewards/__init__.py.
"""

from __future__ import annotations

from ..errors import UserError
from .models import _vader, cosine_pairs
from .text import ngrams, words


def _need(kwargs: dict, key: str, fn: str) -> list:
    if key not in kwargs:
        raise UserError(f"reward '{fn}' needs the dialog environment ('{key}' is missing)", "set env.kind: dialog")
    return list(kwargs[key])


def user_sentiment(prompts, completions, **kwargs) -> list[float]:
    """VADER compound sentiment of the simulated user's next reply (−1 .. 1)."""
    an = _vader()
    return [an.polarity_scores(u or "")["compound"] for u in _need(kwargs, "user_reply", "user_sentiment")]


def engagement(prompts, completions, target_words: int = 12, **kwargs) -> list[float]:
    """Does the user keep talking? 0.5·[the reply asks a question (has '?')] + 0.5·min(1, words / target_words).

    0 for an empty reply; 1 for a question of at least `target_words` words (default 12).
    """
    out = []
    for u in _need(kwargs, "user_reply", "engagement"):
        u = u or ""
        asks = 1.0 if "?" in u else 0.0
        out.append(0.5 * asks + 0.5 * min(1.0, len(words(u)) / max(target_words, 1)))
    return out


def relevance(prompts, completions, **kwargs) -> list[float]:
    """MiniLM cosine similarity of the assistant's reply and the user's message it answers (−1 .. 1)."""
    return cosine_pairs([p if p.strip() else "." for p in prompts], [c if c.strip() else "." for c in completions])


def turn_repetition(prompts, completions, n: int = 3, **kwargs) -> list[float]:
    """Share of this reply's word n-grams (default trigrams) that occur in the assistant's earlier
    turns of the episode (0 .. 1; 0 on the first turn). A penalty: give it a negative weight."""
    history = kwargs.get("assistant_history") or [[] for _ in completions]
    out = []
    for c, hist in zip(completions, history):
        grams = ngrams(words(c), n)
        if not grams or not hist:
            out.append(0.0)
            continue
        seen = {g for h in hist for g in ngrams(words(h), n)}
        out.append(sum(g in seen for g in grams) / len(grams))
    return out
