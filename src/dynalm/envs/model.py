"""A learned environment model as an environment: `env: {kind: model, path: em/}`.

The model `dynalm train-env-model` saved (envmodel/) plays the environment through the
same interface as a user's own (envs/custom.py, whose episode bookkeeping, reward terms,
transcripts and forks it reuses): each turn it predicts, for every live episode in one
batch, whether the episode ends, the next observation (sampled) and the reward. Episodes
open with the data row's prompt when the run has data, else with the openings the model
saw in its training transitions (a seed row picks opening `seed mod count`), so a game
learned from its transitions needs neither its code nor a data file. `info["imagined"]`
marks every step; the model predicts no `success`.
"""

from __future__ import annotations

from ..config import Config
from ..data import render_template
from ..errors import UserError
from ..rewards import RewardSet
from .custom import CustomEnv, SeedRow


class ModelEnv(CustomEnv):
    def __init__(self, cfg: Config, tokenizer, rewards: RewardSet | None = None, *, device=None, model=None, openings=None):
        """The model at `env.path`, or (Dyna, envmodel/dyna.py) a given `model` with its `openings`."""
        e = cfg.env
        self.cfg, self.tokenizer = cfg, tokenizer
        self.max_turns = e.max_turns if e.kind in ("custom", "model") else e.turns
        self.rewards = rewards if rewards is not None else RewardSet(cfg.rewards)
        if model is None:
            from ..envmodel import load_env_model

            model, meta = load_env_model(e.path, device)
            openings = meta["openings"]
        self.name = f"model {e.path or 'online'}"
        self.model, self.openings = model, list(openings or [])

    def _reset_all(self, rows):
        d = self.cfg.data
        for row in rows:
            if isinstance(row, SeedRow):
                if not self.openings:
                    raise UserError(f"environment model '{self.cfg.env.path or 'online'}' saw no episode openings",
                                    "give data.train / data.eval rows to open the episodes with")
                obs = [dict(m) for m in self.openings[row["seed"] % len(self.openings)]]
            else:
                obs = render_template(d.template, row, d.prompt_field)
            yield row, (obs, {}), None

    def _step_all(self, live, replies, where, generator=None):
        obs, rewards, ended = self.model.step([self._msgs[i] for i in live], list(replies), generator)
        return [("" if o is None else o, r, t, False, {"imagined": True}) for o, r, t in zip(obs, rewards, ended)]

    def start_from(self, conversations: list[list[dict]], turn: int = 0) -> None:
        """Imagined episodes that continue the given conversations (planning/lookahead.py)."""
        self._rows = [{} for _ in conversations]
        self._envs = [None] * len(conversations)
        self._msgs = [list(c) for c in conversations]
        self._log = [[dict(m) for m in c] for c in conversations]
        self._turn = turn
