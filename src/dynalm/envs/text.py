"""The single-turn text environment (seed section 3.1 for one step).

State s_0 is the rendered prompt; the action is the whole completion, taken token by token
(s_{t+1} = s_t + a_t); the episode ends at EOS or the token limit, and the sequence reward
comes from the configured reward functions. The environment LM's own per-token reward
(the article's `compute_reward(action, next_logits)`) is α·log P_env(a_t|s_t), with the
frozen reference policy as P_env; the trainer adds it from the reference log-probs.
"""

from __future__ import annotations

from ..config import Config
from ..data import is_messages, prompt_text, render_template
from ..models.generation import render_messages, render_prompt
from ..rewards import RewardSet, ScoredTerms
from .base import Turn


class TextEnv:
    """One turn: the prompt, the completion, its reward. `begin`/`advance` are the batched
    episode interface the rollout drives (envs/base.py); `reset(row)` and `step(rows,
    completions)` are the same environment for the planners, which score candidates and
    partial texts themselves."""

    max_turns = 1
    single_turn = True

    def __init__(self, cfg: Config, tokenizer, rewards: RewardSet | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.rewards = rewards if rewards is not None else RewardSet(cfg.rewards)
        self._rows: list[dict] = []

    # ------------------------------------------------------------------ episodes (rl/episodes.py)
    def begin(self, rows: list[dict], *, training: bool) -> tuple[list[str], list[str]]:
        self._rows = list(rows)
        return [self.reset(r) for r in rows], [prompt_text(r, self.cfg.data.prompt_field) for r in rows]

    def advance(self, live, replies, last_tokens, ended, *, training: bool, generator=None, score: bool = True) -> Turn:
        n = len(live)
        if not score:  # scored by the caller (Dyna: a share by the true reward, the rest by its model)
            return Turn([0.0] * n, {}, [True] * n, [False] * n, [None] * n)
        _, scored, _ = self.step([self._rows[i] for i in live], list(replies), list(ended), training=training)
        return Turn(list(scored.scores), scored.terms, [True] * n, [False] * n, [None] * n)

    def transcripts(self) -> list[list[dict]]:
        return []

    def episode_info(self) -> dict:
        return {}

    def reset(self, row: dict) -> str:
        """The initial state: the prompt as the model sees it."""
        d, m = self.cfg.data, self.cfg.model
        if is_messages(row[d.prompt_field]):  # TRL's conversational format: the conversation itself, no template
            return render_messages(self.tokenizer, row[d.prompt_field], chat=m.use_chat_template, system_prompt=m.system_prompt)
        text = render_template(d.template, row, d.prompt_field)
        return render_prompt(self.tokenizer, text, chat=m.use_chat_template, system_prompt=m.system_prompt)

    def step(
        self, rows: list[dict], completions: list[str], ended: list[bool] | None = None, *, training: bool = False
    ) -> tuple[list[str], ScoredTerms, list[bool]]:
        """Next states, rewards and done flags for a batch of finished completions.

        Reward functions get the rows' other fields as keyword lists (e.g. `reference`), and
        `ended`: whether each completion stopped at EOS rather than the token limit.
        `training` lets normalised reward terms update their running statistics.
        """
        prompts = [prompt_text(r, self.cfg.data.prompt_field) for r in rows]
        pf = self.cfg.data.prompt_field
        extras = {k: [r.get(k) for r in rows] for k in sorted({k for r in rows for k in r} - {pf})}
        if any(is_messages(r[pf]) for r in rows):  # conversational rows: the whole conversation too
            extras["prompt_messages"] = [r[pf] if is_messages(r[pf]) else [{"role": "user", "content": str(r[pf])}] for r in rows]
        extras["ended"] = list(ended) if ended is not None else [True] * len(rows)
        scored = self.rewards(prompts, completions, update_stats=training, **extras)
        next_states = [self.reset(r) + c for r, c in zip(rows, completions)]
        return next_states, scored, [True] * len(rows)
