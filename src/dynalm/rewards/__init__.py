"""Reward functions and their weighted composition.

A reward function is `fn(prompts: list[str], completions: list[str], **extras) -> list[float]`
(TRL's shape), called by keyword as TRL calls it, so it may take only what it uses
(`fn(completions, **kw)`, `fn(completions, solution, **kw)`). Config names one or several: a built-in by name, a user's callable as
`path/to/file.py:function` or `package.module:function`. Each term is checked (one finite
number per completion) and logged on its own; the sequence score is their weighted sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..config import RewardTerm
from ..errors import UserError
from ..loader import load_callable
from . import dialog, models, tasks, text

RewardFn = Callable[..., list[float]]

BUILTINS: dict[str, RewardFn] = {
    "distinct1": text.distinct1,
    "distinct2": text.distinct2,
    "novelty": text.novelty,
    "repetition": text.repetition,
    "length": text.length,
    "mentions": text.mentions,
    "copy": text.copy,
    "relatedness": models.relatedness,
    "sentiment": models.sentiment,
    "chrf": tasks.chrf,
    "bleu": tasks.bleu,
    "ter": tasks.ter,
    "rhyme": tasks.rhyme,
    "line_shape": tasks.line_shape,
    "theme_relevance": tasks.theme_relevance,
    "eos": tasks.eos,
    "length_floor": tasks.length_floor,
    # turn rewards of the dialog environment (env.kind: dialog)
    "user_sentiment": dialog.user_sentiment,
    "engagement": dialog.engagement,
    "relevance": dialog.relevance,
    "turn_repetition": dialog.turn_repetition,
    "goal_relevance": dialog.goal_relevance,
    "batch_repetition": dialog.batch_repetition,
}


def register(name: str, fn: RewardFn | None = None):
    """Register a built-in reward (usable as a decorator)."""

    def deco(f):
        BUILTINS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def resolve(name: str) -> RewardFn:
    """A reward function from a built-in name, 'file.py:fn' or 'package.module:fn'."""
    if name in BUILTINS:
        return BUILTINS[name]
    if name.startswith("rm:"):  # a reward model trained with `dynalm train-rm`
        from .learned import resolve_learned

        return resolve_learned(name)
    if ":" in name:
        return load_callable(name, what="reward")
    import difflib

    close = difflib.get_close_matches(name, BUILTINS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"built-ins: {', '.join(sorted(BUILTINS))}; or 'file.py:function'"
    raise UserError(f"unknown reward '{name}'", hint)


def term_name(term: RewardTerm) -> str:
    if term.alias:
        return term.alias
    if term.name.startswith("rm:"):
        return "reward_model"
    return term.name.rpartition(":")[2] if ":" in term.name else term.name


@dataclass
class ScoredTerms:
    terms: dict[str, list[float]]
    scores: list[float]


class RewardSet:
    """The configured reward terms, called together."""

    def __init__(self, terms: list[RewardTerm]):
        self.terms = [(term_name(t), resolve(t.name), t) for t in terms]
        names = [n for n, _, _ in self.terms]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise UserError(f"two reward terms are named '{sorted(dup)[0]}'", "give one of them an alias")
        # running [count, mean, M2] per normalised term (Welford), part of the checkpoint
        self.stats: dict[str, list[float]] = {n: [0.0, 0.0, 0.0] for n, _, t in self.terms if t.normalize}
        # data-parallel: values of every process in global order, so the statistics are the
        # whole batch's and the same on every process (set by the Trainer; None = this process only)
        self.gather = None

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.stats[k] = list(v)

    def _shape(self, name: str, term: RewardTerm, vals: list[float], update: bool) -> list[float]:
        """Normalise (running mean/std; stats move only when `update`) and clip one term."""
        out = vals
        if term.normalize:
            st = self.stats[name]
            if update:
                for v in self.gather(vals) if self.gather is not None else vals:  # Welford's online update
                    st[0] += 1
                    d = v - st[1]
                    st[1] += d / st[0]
                    st[2] += d * (v - st[1])
            std = math.sqrt(st[2] / (st[0] - 1)) if st[0] > 1 else 1.0
            out = [(v - st[1]) / (std + 1e-8) for v in out]
        if term.clip is not None:
            out = [min(max(v, -term.clip), term.clip) for v in out]
        return out

    def combine(self, terms: dict[str, list[float]]) -> list[float]:
        """The weighted score of raw terms shaped with the current statistics (which do not move)."""
        n = len(next(iter(terms.values()))) if terms else 0
        shaped = {name: self._shape(name, term, terms[name], False) for name, _, term in self.terms}
        return [sum(t.weight * shaped[name][i] for name, _, t in self.terms) for i in range(n)]

    @property
    def names(self) -> list[str]:
        return [n for n, _, _ in self.terms]

    def __call__(self, prompts: list[str], completions: list[str], *, update_stats: bool = False, **extras) -> ScoredTerms:
        """Each term (raw, as logged) and the weighted score of the shaped terms."""
        out: dict[str, list[float]] = {}
        shaped: dict[str, list[float]] = {}
        for name, fn, term in self.terms:
            try:
                # by keyword, as TRL calls reward functions: `f(completions, **kw)` and
                # `f(completions, solution, **kw)` work unchanged, and so does `f(prompts, completions, **kw)`
                vals = fn(prompts=prompts, completions=completions, **extras, **term.kwargs)
            except UserError:
                raise
            except Exception as exc:
                raise UserError(
                    f"reward function '{name}' raised {type(exc).__name__}: {exc}", "fix the reward function"
                ) from None
            out[name] = check_values(name, vals, len(completions))
            shaped[name] = self._shape(name, term, out[name], update_stats)
        scores = [sum(t.weight * shaped[n][i] for n, _, t in self.terms) for i in range(len(completions))]
        return ScoredTerms(out, scores)


def check_values(name: str, vals, n: int) -> list[float]:
    try:
        vals = list(vals)
    except TypeError:
        raise UserError(
            f"reward function '{name}' returned {type(vals).__name__}, not a list", "return one float per completion"
        ) from None
    if len(vals) != n:
        raise UserError(
            f"reward function '{name}' returned {len(vals)} values for {n} completions", "return one float per completion"
        )
    out = []
    for i, v in enumerate(vals):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise UserError(
                f"reward function '{name}' returned a non-number at index {i}: {v!r}", "return floats"
            ) from None
        if not math.isfinite(f):
            raise UserError(f"reward function '{name}' returned {f} at index {i}", "return finite numbers")
        out.append(f)
    return out
