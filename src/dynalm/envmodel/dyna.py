"""Dyna with a learned environment model (Sutton 1990; Deep Dyna-Q, Peng et al. 2018, for
dialog): each training step, a share of the episodes is played entirely inside the learned
model P(s', r, done | s, a) (imagined observations, rewards and ends) and the rest in the
real environment; the model is refit on the real transitions as they arrive.

    dyna: {enabled: true, env_model: em/ | online, imagined_fraction: 0.5}

`online` starts from the base model prompted as the environment (a fresh adapter and heads
on `dyna.env_model_base`); a folder starts from a `dynalm train-env-model` model. Either
way each real rollout is first *measured* — next-observation NLL per token and reward MAE
of the model on those transitions, before it has seen them — then added to a replay buffer
(`dyna.max_buffer`, oldest dropped) that `env_model_fit_steps` Adam steps sample from
(0 = a fixed model). The first `dyna.warmup_steps` steps are all real. An online model's
reward scale (mean and std) is set from its first real batch and then kept.

Imagined episodes open like real ones: with the data row's prompt, or (an environment
without data) with a real opening the model has seen. Counted and logged each step:
`dyna/real_steps` and `dyna/imagined_steps` (assistant turns so far, each side).
"""

from __future__ import annotations

import math
import random

import torch

from ..config import Config
from ..transitions import episode_transitions
from .data import openings
from .network import EnvModel, EnvModelConfig


class EnvDyna:
    def __init__(self, cfg: Config, tokenizer, device):
        from ..envs.model import ModelEnv
        from ..rewards import RewardSet

        d = cfg.dyna
        self.cfg = cfg
        if d.env_model == "online":
            em_cfg = EnvModelConfig(model=d.env_model_base or cfg.model.name, data="online", seed=cfg.seed,
                                    device=cfg.model.device, max_observation_tokens=d.env_model_max_observation_tokens)
            model, opens, self.scaled = EnvModel.build(em_cfg, device=device), [], False
        else:
            from .train import load_env_model

            model, meta = load_env_model(d.env_model, device, fresh=True)
            opens, self.scaled = [list(o) for o in meta["openings"]], True
        # the model predicts the real environment's whole turn reward: no reward terms on top
        self.env = ModelEnv(cfg, tokenizer, RewardSet([]), model=model, openings=opens)
        self.model = model
        self.opt = torch.optim.Adam(model.parameters_to_train(), lr=d.env_model_learning_rate) if d.env_model_fit_steps else None
        self.buffer: list[dict] = []
        self.real_steps = self.imagined_steps = 0
        self.rng = random.Random(cfg.seed + 7)

    # ------------------------------------------------------------------ the split
    def imagined_groups(self, k: int, step: int, seeded: bool) -> int:
        """How many of the step's k groups are played inside the model."""
        if step <= self.cfg.dyna.warmup_steps or (seeded and not self.env.openings):
            return 0
        return min(k - 1, round(k * self.cfg.dyna.imagined_fraction)) if k > 1 else 0

    def draw(self, roll, real_env, rows: list, group: list[int], n: int, step: int, pad_id: int):
        """The step's episodes: the first groups in `real_env`, the last `imagined_groups` inside
        the model; `roll(env, rows, group)` is the trainer's rollout. Returns (batch, truncated, info)."""
        from ..envs.custom import SeedRow
        from ..rl.batch import Batch

        k = len(rows) // n
        cut = (k - self.imagined_groups(k, step, isinstance(rows[0], SeedRow))) * n
        batch, trunc, info = roll(real_env, rows[:cut], group[:cut])
        imagined = []
        if cut < len(rows):
            b_img, t_img, i_img = roll(self.env, rows[cut:], group[cut:])
            imagined = b_img.extras.get("transcript", [])
            info["time/env"] += i_img["time/env"]
            info["time/imagined"] = i_img["time/env"]
            batch, trunc = Batch.concat([batch, b_img], pad_id), trunc + t_img
        info.update(self.observe(batch.extras["transcript"][:cut], imagined))
        info["dyna/real_episodes"] = cut  # scored by the real environment this step
        return batch, trunc, info

    # ------------------------------------------------------------------ learning from the real side
    def observe(self, transcripts: list[list[dict]], imagined: list[list[dict]]) -> dict:
        """Count both sides, measure the model on the new real transitions, then refit."""
        real = [t for ep in transcripts for t in episode_transitions(ep)]
        self.real_steps += len(real)
        self.imagined_steps += sum(1 for ep in imagined for m in ep if m["role"] == "assistant")
        seen = {repr(o) for o in self.env.openings}
        self.env.openings += [o for o in openings([{"turn": t["turn"], "state": t["state"]} for t in real]) if repr(o) not in seen]
        out = {"dyna/real_steps": self.real_steps, "dyna/imagined_steps": self.imagined_steps}
        if not real:
            return out
        if not self.scaled:
            rs = [float(t["reward"]) for t in real]
            self.model.reward_mean = sum(rs) / len(rs)
            sd = math.sqrt(sum((x - self.model.reward_mean) ** 2 for x in rs) / len(rs))
            self.model.reward_std, self.scaled = (sd if sd > 1e-8 else 1.0), True
        from .train import evaluate_env_model

        m = evaluate_env_model(self.model, real, self.cfg.dyna.env_model_fit_batch_size)
        out["dyna/env_model_reward_mae"] = m["reward_mae"]
        if m["nll_per_token"] is not None:  # no observation in these transitions: nothing to score
            out["dyna/env_model_nll"] = m["nll_per_token"]
        self.buffer = (self.buffer + real)[-self.cfg.dyna.max_buffer :]
        self.model.note_observations(real)
        if self.opt is not None:
            out["dyna/env_model_fit_loss"] = self._fit()
        return out

    def _fit(self) -> float:
        d = self.cfg.dyna
        self.model.train()
        total = 0.0
        try:
            for _ in range(d.env_model_fit_steps):
                rows = self.rng.sample(self.buffer, min(d.env_model_fit_batch_size, len(self.buffer)))
                loss, _ = self.model.loss(rows)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                total += float(loss.detach())
        finally:
            self.model.eval()
        return total / d.env_model_fit_steps

    def save(self, out) -> None:
        """The model as learned so far, as a `dynalm train-env-model` folder (env.kind model, planner.env_model)."""
        from .train import save_env_model

        save_env_model(self.model, out, {"online": True, "real_steps": self.real_steps, "buffer": len(self.buffer)},
                       self.env.openings)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.trainable_state_dict(), "opt": self.opt.state_dict() if self.opt else None,
                "buffer": list(self.buffer), "openings": list(self.env.openings), "real_steps": self.real_steps,
                "imagined_steps": self.imagined_steps, "reward": (self.model.reward_mean, self.model.reward_std, self.scaled),
                "longest_observation": self.model.longest_observation, "rng": self.rng.getstate()}

    def load_state_dict(self, s: dict) -> None:
        self.model.load_state_dict(s["model"], strict=False)
        if self.opt is not None and s["opt"] is not None:
            self.opt.load_state_dict(s["opt"])
        self.buffer, self.env.openings = list(s["buffer"]), list(s["openings"])
        self.real_steps, self.imagined_steps = s["real_steps"], s["imagined_steps"]
        self.model.reward_mean, self.model.reward_std, self.scaled = s["reward"]
        self.model.longest_observation = s.get("longest_observation")
        self.rng.setstate(s["rng"])
