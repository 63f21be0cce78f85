"""The environment interface: what a user writes, and what the rollout drives.

**What a user writes** (gymnasium's shape, with text in and out; one instance per episode):

    class MyEnv:
        def reset(self, seed=None, options=None):      # options: the data row, or None
            return observation, info
        def step(self, action: str):                    # action: the assistant's turn
            return observation, reward, terminated, truncated, info

An observation is a string (shown to the policy as the next user message) or a list of
chat messages (`{"role": "tool", "content": ...}`, `{"role": "user", ...}`), rendered
through the model's chat template. `info` may carry `success` (counted in eval); the rest
is kept in the transcripts. `env: {kind: custom, factory: my_env.py:make_env}` names a
class or a function that returns one instance (see envs/custom.py).

**What the rollout drives** (`rl/episodes.py`): an `EpisodeEnv`, batched over the episodes
of one rollout, so that a simulator can batch its own model calls (the dialog env's user
LM) and the policy samples the next turn of every live episode in one batch. The text,
dialog and custom environments all implement it; nothing in `rl/` tells them apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import UserError


@dataclass
class Turn:
    """One batched assistant turn, for the episodes that were live (in that order)."""

    rewards: list[float]  # the turn's weighted score per episode
    terms: dict[str, list[float]]  # each reward term, raw (logged as reward/<name>)
    done: list[bool]  # no further turn: terminated or truncated
    truncated: list[bool] = field(default_factory=list)  # the env cut the episode (not a natural end)
    glue: list[str | None] = field(default_factory=list)  # text before the next assistant turn (None when done)
    infos: list[dict] = field(default_factory=list)


class EpisodeEnv(Protocol):
    """The batched interface `rl.episodes.rollout` drives; one rollout at a time."""

    max_turns: int  # assistant turns at most; episodes still running after them are truncated
    # True only for an environment whose episode is the prompt and one completion with no
    # transcript (TextEnv): the rollout then samples once and skips the turn bookkeeping.
    # A multi-turn env configured with max_turns 1 keeps False and still writes transcripts.
    single_turn: bool = False

    def begin(self, rows: list[dict], *, training: bool) -> tuple[list[str], list[str]]:
        """Start one episode per row: (the rendered first prompt, its plain text for logs)."""
        ...

    def advance(
        self, live: list[int], replies: list[str], last_tokens: list[int | None], ended: list[bool], *,
        training: bool, generator=None, score: bool = True,
    ) -> Turn:
        """The assistant's turn for the episodes `live` (indices into the rows of `begin`).
        `last_tokens[j]` is the stop token the turn ended on (None when cut at the limit)."""
        ...

    def transcripts(self) -> list[list[dict]]:
        """Every episode of the rollout as chat messages; assistant turns carry reward and terms."""
        ...

    def episode_info(self) -> dict[str, float]:
        """Environment-specific metrics of the last rollout (logged; may be empty)."""
        ...


def as_messages(obs, where: str) -> list[dict]:
    """An observation as chat messages: a string is the user's next message."""
    if isinstance(obs, str):
        return [{"role": "user", "content": obs}]
    if isinstance(obs, list) and obs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in obs
    ):
        return [{"role": m["role"], "content": m["content"]} for m in obs]
    raise UserError(
        f"{where} returned an observation of type {type(obs).__name__}, not text or chat messages",
        'return a string or a list of {"role": ..., "content": ...} messages',
    )


def as_reward(r, where: str) -> float:
    try:
        f = float(r)
    except (TypeError, ValueError):
        raise UserError(f"{where} returned the reward {r!r}, not a number", "return a finite float") from None
    if not math.isfinite(f):
        raise UserError(f"{where} returned the reward {f}", "return a finite float")
    return f


def format_transcript(turns: list[dict]) -> str:
    """A conversation as plain text, one `role: content` line per message."""
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)
