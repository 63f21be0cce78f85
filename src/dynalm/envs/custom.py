"""Bring your own environment: gymnasium-style text environments from `env.factory`.

    env: {kind: custom, factory: my_env.py:make_env, kwargs: {...}, max_turns: 8}

The factory (a class or a function) is called with `env.kwargs` once per episode and
returns an object with gymnasium's methods, text in and out (envs/base.py):

    reset(seed=None, options=None) -> (observation, info)
    step(action: str) -> (observation, reward, terminated, truncated, info)

`options` is the data row when the run has data (`data.train` / `data.eval`), else None.
Without data, training episodes are reset with seeds from a counter, 0, 1, 2, … in the
order the run takes them (plus `seed` · 1,000,000, so runs with other seeds play other
games), and eval episodes with the fixed, disjoint seeds 1,000,000,000 + i — the same for
every run, so base and trained, or two runs, are compared on the same games. A grpo/rloo
group shares one seed (one row). An observation is a string (the next user message) or a
list of chat messages (a tool result: `{"role": "tool", "content": ...}`); the step reward
plus the configured reward terms (`env.rewards_on`: every turn or the last one) is the
turn's reward. `info["success"]` of an episode's last step is counted in eval.

Every mistake of an environment — a factory that does not import, `reset`/`step` raising,
a reward that is not a finite number, an observation that is not text — is one line
naming the environment and the turn; an episode that does not end within `env.max_turns`
is cut there and counted as truncated.
"""

from __future__ import annotations

import copy

from ..config import Config
from ..errors import UserError
from ..models.generation import glue_text, render_messages
from ..loader import load_callable
from ..rewards import RewardSet
from .base import Turn, as_messages, as_reward

TRAIN_SEED_STRIDE = 1_000_000
EVAL_SEED_BASE = 1_000_000_000


class SeedRow(dict):
    """A row that carries only the seed of an episode (runs without data)."""


class SeedRows:
    """An endless-enough sequence of seed rows: `base + i` for i in range(n), taken in order."""

    ordered = True

    def __init__(self, base: int, n: int):
        self.base, self.n = base, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        return SeedRow(seed=self.base + i)

    def __iter__(self):
        return (self[i] for i in range(self.n))


def train_seed_rows(cfg: Config) -> SeedRows:
    return SeedRows((cfg.seed % 1000) * TRAIN_SEED_STRIDE, TRAIN_SEED_STRIDE)


def eval_seed_rows(cfg: Config) -> SeedRows:
    return SeedRows(EVAL_SEED_BASE, cfg.eval.max_prompts or 32)


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


class CustomEnv:
    """The batched episode interface (envs/base.py) over one user environment per episode."""

    def __init__(self, cfg: Config, tokenizer, rewards: RewardSet | None = None):
        e = cfg.env
        self.cfg, self.tokenizer, self.name = cfg, tokenizer, e.factory
        self.factory = load_callable(e.factory, what="env factory")
        self.max_turns = e.max_turns
        self.rewards = rewards if rewards is not None else RewardSet(cfg.rewards)

    def _call(self, fn, what: str, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except Exception as exc:  # the user's environment failed: one line, naming it and the turn
            raise UserError(f"env '{self.name}' {what} raised {_one_line(exc)}", "fix the environment") from None

    def _render(self, msgs: list[dict]) -> str:
        m = self.cfg.model
        return render_messages(self.tokenizer, msgs, chat=m.use_chat_template, system_prompt=m.system_prompt)

    # ------------------------------------------------------------------ the user's environments
    def _reset_all(self, rows: list[dict]):
        """(row, reset's return, the episode's env) per row: one new env each."""
        for row in rows:
            env = self._call(self.factory, "factory", **self.cfg.env.kwargs)
            seeded = isinstance(row, SeedRow)
            yield row, self._call(env.reset, "reset", seed=row["seed"] if seeded else None,
                                  options=None if seeded else dict(row)), env

    def _step_all(self, live: list[int], replies: list[str], where: str, generator=None) -> list:
        """step's return for each live episode's reply (a batched env overrides this)."""
        return [self._call(self._envs[i].step, where, r) for i, r in zip(live, replies)]

    # ------------------------------------------------------------------ episodes
    def begin(self, rows: list[dict], *, training: bool) -> tuple[list[str], list[str]]:
        self._rows, self._envs, self._msgs, self._turn = list(rows), [], [], 0
        self._log: list[list[dict]] = []
        for row, out, env in self._reset_all(rows):
            if not (isinstance(out, tuple) and len(out) == 2):
                raise UserError(f"env '{self.name}' reset returned {type(out).__name__}", "return (observation, info)")
            msgs = as_messages(out[0], f"env '{self.name}' reset")
            self._envs.append(env)
            self._msgs.append(msgs)
            self._log.append([dict(m) for m in msgs])
        return [self._render(m) for m in self._msgs], [m[-1]["content"] for m in self._msgs]

    def advance(self, live, replies, last_tokens, ended, *, training: bool, generator=None, score: bool = True) -> Turn:
        self._turn += 1
        where = f"step (turn {self._turn})"
        env_r, done, cut, obs_msgs, infos = [], [], [], [], []
        for j, out in enumerate(self._step_all(live, replies, where, generator)):
            if not (isinstance(out, tuple) and len(out) == 5):
                raise UserError(
                    f"env '{self.name}' {where} returned {type(out).__name__}", "return (observation, reward, terminated, truncated, info)"
                )
            obs, r, term, trunc, info = out
            env_r.append(as_reward(r, f"env '{self.name}' {where}"))
            fin = bool(term) or bool(trunc)
            done.append(fin)
            cut.append(bool(trunc) and not bool(term))
            obs_msgs.append(None if fin else as_messages(obs, f"env '{self.name}' {where}"))
            infos.append(dict(info) if isinstance(info, dict) else {})
        terms = {"env": env_r}
        total = list(env_r)
        if self.rewards.terms:
            on_turn = self.cfg.env.rewards_on == "turn"
            idx = [j for j in range(len(live)) if on_turn or done[j] or self._turn >= self.max_turns]
            for name in self.rewards.names:
                terms[name] = [0.0] * len(live)
            if idx:
                pf = self.cfg.data.prompt_field
                rows = [self._rows[live[j]] for j in idx]
                keys = sorted({k for r in rows for k in r} - {pf})
                extras = {k: [r.get(k) for r in rows] for k in keys}
                scored = self.rewards(
                    [self._msgs[live[j]][-1]["content"] for j in idx], [replies[j] for j in idx], update_stats=training,
                    ended=[ended[j] for j in idx], turn=[self._turn] * len(idx), **extras,
                )
                for n, vals in scored.terms.items():
                    for j, v in zip(idx, vals):
                        terms[n][j] = v
                for j, v in zip(idx, scored.scores):
                    total[j] += v
        glue = []
        for j, i in enumerate(live):
            self._log[i].append({"role": "assistant", "content": replies[j], "reward": total[j],
                                 "terms": {n: v[j] for n, v in terms.items()}, "info": _jsonable(infos[j]),
                                 **({"truncated": True} if cut[j] else {})})
            if obs_msgs[j] is None:
                glue.append(None)
                continue
            m = self.cfg.model
            glue.append(glue_text(self.tokenizer, self._msgs[i], obs_msgs[j], last_tokens[j],
                                  chat=m.use_chat_template, system_prompt=m.system_prompt))
            self._msgs[i] = self._msgs[i] + [{"role": "assistant", "content": replies[j]}] + obs_msgs[j]
            self._log[i] += [dict(o) for o in obs_msgs[j]]
        return Turn(total, terms, done, cut, glue, infos)

    def transcripts(self) -> list[list[dict]]:
        return [list(t) for t in self._log]

    # ------------------------------------------------------------------ planning
    def messages(self, i: int) -> list[dict]:
        """Episode i's conversation so far (what the policy is shown next, rendered)."""
        return self._msgs[i]

    def render(self, i: int) -> str:
        return self._render(self._msgs[i])

    def fork(self, episodes: list[int], n: int) -> "CustomEnv":
        """A new batch of episodes: n copies of each of `episodes` (in that order), each with
        its own deep copy of the user's environment, to try n actions before taking one.
        The environment must survive `copy.deepcopy` (as gymnasium planning asks)."""
        out = object.__new__(type(self))  # a ModelEnv forks as a ModelEnv
        out.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        out._turn = self._turn
        out._rows = [self._rows[i] for i in episodes for _ in range(n)]
        out._msgs = [list(self._msgs[i]) for i in episodes for _ in range(n)]
        out._log = [[dict(m) for m in self._log[i]] for i in episodes for _ in range(n)]
        out._envs = [self._call(copy.deepcopy, "deepcopy (planning needs a copyable env)", self._envs[i]) for i in episodes for _ in range(n)]
        return out

    def adopt(self, i: int, fork: "CustomEnv", j: int) -> None:
        """Make episode i continue as the fork's episode j (the action that was chosen)."""
        self._envs[i], self._msgs[i], self._log[i] = fork._envs[j], fork._msgs[j], fork._log[j]
        self._turn = fork._turn

    def episode_info(self) -> dict:
        return {}


def _jsonable(info: dict) -> dict:
    """What of an info dict can go into a JSON transcript (other values as their repr)."""
    out = {}
    for k, v in info.items():
        out[str(k)] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)
    return out
