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


def _goal_cosines(kwargs: dict, fn: str) -> list[float]:
    """MiniLM cosine of each simulated user reply and that user's own goal (the row's `goal`)."""
    users = [u or "" for u in _need(kwargs, "user_reply", fn)]
    if "goal" not in kwargs:
        raise UserError(f"reward '{fn}' needs a 'goal' field in every data row", "add goal to the rows, or drop the term")
    goals = [g or "" for g in kwargs["goal"]]
    return cosine_pairs([u if u.strip() else "." for u in users], [g if g.strip() else "." for g in goals])


def user_sentiment(prompts, completions, on_goal: float | None = None, **kwargs) -> list[float]:
    """VADER compound sentiment of the simulated user's next reply (−1 .. 1).

    With `on_goal: t` (a MiniLM cosine, e.g. 0.4) a *positive* sentiment is paid only as far
    as the user's reply stays on the user's own goal: in full when cos(reply, goal) ≥ t,
    nothing when it is ≤ t/2, linearly between. A user who gushes back at a flattering
    assistant ("you're so sweet!") has left their goal, so the gush earns nothing; negative
    sentiment is always paid in full (an unhappy user is never excused)."""
    an = _vader()
    sent = [an.polarity_scores(u or "")["compound"] for u in _need(kwargs, "user_reply", "user_sentiment")]
    if on_goal is None:
        return sent
    if not 0 < on_goal <= 1:
        raise UserError(f"user_sentiment's on_goal must lie in (0, 1], not {on_goal}", "e.g. kwargs: {on_goal: 0.4}")
    gates = [min(1.0, max(0.0, (c - on_goal / 2) / (on_goal / 2))) for c in _goal_cosines(kwargs, "user_sentiment")]
    return [s * g if s > 0 else s for s, g in zip(sent, gates)]


def goal_relevance(prompts, completions, **kwargs) -> list[float]:
    """MiniLM cosine of the simulated user's next reply and the user's own goal (−1 .. 1):
    does the conversation stay on what the user came for (breakfast ideas, not compliments)?"""
    return _goal_cosines(kwargs, "goal_relevance")


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


def batch_repetition(prompts, completions, n: int = 3, **kwargs) -> list[float]:
    """Share of this reply's word n-grams (default trigrams) that also occur in *another*
    reply of the same call — across the batch's episodes (0 .. 1). Stock phrases the policy
    says to everyone ("what a wonderful question") score high; a reply written for its
    conversation scores near 0. A penalty: give it a negative weight. The value depends on
    the batch it is scored in (training and eval batch every live episode's turn together)."""
    grams = [ngrams(words(c), n) for c in completions]
    owners: dict[tuple, set[int]] = {}
    for i, gs in enumerate(grams):
        for g in gs:
            owners.setdefault(g, set()).add(i)
    return [sum(len(owners[g]) > 1 for g in gs) / len(gs) if gs else 0.0 for gs in grams]
