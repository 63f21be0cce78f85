"""The training loop: rollout → score → reference → rewards → advantages → update → log.

The algorithm-specific stages come from the algorithm's table entry (rl/algorithms.py via
rl/objectives.py); the gradient steps from rl/update.py. Nothing here tests an algorithm's name.

Reads top to bottom, one step at a time. Each stage adds fields to the Batch; none reaches
back into an earlier one. The rollout is the one of every environment (rl/episodes.py): the
env answers and scores each turn; the later stages act on the assistant's tokens only (the
action mask), single-turn or multi-turn alike.

With a `Dist` (several processes, see distributed.py) each process rolls out its share of
the step's prompts and the stages that look across the batch (whitening, the update, the
KL controller, metrics) use every process's rows; without one, nothing here communicates.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..config import Config
from ..distributed import Dist, global_explained_variance, global_masked_mean, global_masked_var, rank_seed
from ..dyna import Dyna
from ..envs import EpisodeEnv, make_env
from ..errors import UserError
from ..models import fastdecode
from ..models.policy import PolicyValueModel
from . import advantages as adv_mod
from .objectives import loss_fn, shape_batch, zero_std_groups
from .update import (  # noqa: F401 (some re-exported)
    NonFiniteError, PromptSampler, _nonfinite, build_optimizer, build_scheduler, recompute_logprobs, update, wants_recompute,
)
from .batch import Batch
from .dynamic_sampling import refill_flat_groups
from .kl import KLController
from .episodes import rollout


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Rows:
    """The step's rows gathered from every process, in global order: what rank 0 logs."""

    prompts: list[str]
    completions: list[str]
    scores: torch.Tensor
    reward_terms: dict[str, torch.Tensor]
    episode_returns: list[float]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class StepResult:
    batch: Batch  # this process's rows (all of them in a 1-process run)
    metrics: dict
    rows: Rows | None = None  # data-parallel: every process's rows, for the logs


class Trainer:
    """Owns the model, optimizer and state of one run; `step()` does one RL iteration.

    With `dist` (a data-parallel run, distributed.py) this process rolls out its share of
    each step's prompts and the update, whitening, KL controller and metrics span all shares.
    """

    def __init__(
        self, cfg: Config, model: PolicyValueModel, train_rows: list[dict], env: EpisodeEnv | None = None,
        dist: Dist | None = None,
    ):
        self.cfg = cfg
        self.model = model
        self.rows = train_rows
        self.dist = dist
        self.env = env or make_env(cfg, model)
        self.opt = build_optimizer(model, cfg.train)
        self.sched = build_scheduler(self.opt, cfg.train)
        k = cfg.kl
        self.kl_ctl = KLController(k.coef, k.target if k.adaptive else None, k.horizon)
        # rows that stand for seeds (an environment without data) are taken in order: a counter
        self.sampler = PromptSampler(len(train_rows), cfg.seed, cfg.data.shuffle and not getattr(train_rows, "ordered", False))
        dev = model.device
        rank = dist.rank if dist is not None else 0
        self.gen = torch.Generator(device=dev).manual_seed(rank_seed(cfg.seed, rank))
        self.update_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same on every process
        self.step_idx = 0
        self.truncated_prompts = 0
        self.skipped_batches = 0
        if dist is not None:
            dist.broadcast_params([p for g in self.opt.param_groups for p in g["params"]])
            # normalised reward terms keep running statistics of the whole batch, in its order
            self.env.rewards.gather = dist.gather_floats
        self.reward_calls = 0  # completions scored by the configured (true) reward so far (this process)
        self.dyna = Dyna(cfg, combine=self.env.rewards.combine) if cfg.dyna.enabled and not cfg.dyna.env_model else None
        self.env_dyna = None  # Dyna over imagined episodes of a learned environment model (envmodel/dyna.py)
        if cfg.dyna.enabled and cfg.dyna.env_model:
            from ..envmodel.dyna import EnvDyna

            if dist is not None:
                raise UserError("dyna.env_model trains in one process", "run it without accelerate launch")

            self.env_dyna = EnvDyna(cfg, model.tokenizer, model.device)
        self.engine = None  # vLLM samples the rollouts (rollout.engine: vllm), colocated
        if cfg.rollout.engine == "vllm":
            from ..models.vllm_engine import VLLMEngine

            self.engine = VLLMEngine.for_run(cfg, model, distributed=dist is not None)

    # -------------------------------------------------------------- state for checkpoints
    def state_dict(self) -> dict:
        """The run state. Data-parallel: a collective (every process calls it); `gen` and
        `rng` are rank 0's and `ranks` holds every process's generator and RNG states."""
        out = {
            "step": self.step_idx,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "kl": self.kl_ctl.state_dict(),
            "sampler": self.sampler.state_dict(),
            "gen": self.gen.get_state(),
            "update_gen": self.update_gen.get_state(),
            "skipped_batches": self.skipped_batches,
            "reward_calls": self.reward_calls,
            "dyna": self.dyna.state_dict() if self.dyna is not None else None,
            "env_dyna": self.env_dyna.state_dict() if self.env_dyna is not None else None,
            "reward_stats": self.env.rewards.state_dict(),
            "rng": _rng_state(),
        }
        if self.dist is not None:
            out["ranks"] = self.dist.gather({"gen": self.gen.get_state(), "rng": out["rng"]})
        return out

    def load_state_dict(self, s: dict) -> None:
        """Data-parallel: a process whose rank the checkpoint has (same or more processes
        before) gets its own generator and RNG states back; one beyond them (more processes
        now) gets a fresh generator seeded from (seed, rank, step)."""
        self.step_idx = s["step"]
        self.opt.load_state_dict(s["optimizer"])
        self.sched.load_state_dict(s["scheduler"])
        self.kl_ctl.load_state_dict(s["kl"])
        self.sampler.load_state_dict(s["sampler"])
        rank = self.dist.rank if self.dist is not None else 0
        ranks = s.get("ranks") or [{"gen": s["gen"], "rng": s["rng"]}]
        if rank < len(ranks):
            self.gen.set_state(ranks[rank]["gen"])
            rng = ranks[rank]["rng"]
        else:
            self.gen.manual_seed(rank_seed(self.cfg.seed * 1_000_003 + s["step"], rank))
            rng = s["rng"]
        self.update_gen.set_state(s["update_gen"])
        self.skipped_batches = s.get("skipped_batches", 0)  # absent in checkpoints from before the option
        self.reward_calls = s.get("reward_calls", 0)
        # reward statistics first: a Dyna refit on load re-normalises its buffer with them
        self.env.rewards.load_state_dict(s.get("reward_stats", {}))
        if self.dyna is not None and s.get("dyna") is not None:
            self.dyna.load_state_dict(s["dyna"])
        if self.env_dyna is not None and s.get("env_dyna") is not None:
            self.env_dyna.load_state_dict(s["env_dyna"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self._apply_config_rates()

    def _apply_config_rates(self) -> None:
        """A resumed run follows its (possibly edited) config.yaml for learning rates and the
        KL controller's target — e.g. a lower train.learning_rate after a NaN stop."""
        t = self.cfg.train
        bases = [t.learning_rate, t.value_learning_rate or t.learning_rate][: len(self.opt.param_groups)]
        self.sched.base_lrs = bases
        for g, base, lam in zip(self.opt.param_groups, bases, self.sched.lr_lambdas):
            g["initial_lr"] = base
            g["lr"] = base * lam(self.sched.last_epoch)
        k = self.cfg.kl
        self.kl_ctl.target = k.target if k.adaptive else None
        self.kl_ctl.horizon = k.horizon

    # -------------------------------------------------------------- one iteration
    def step(self) -> StepResult:
        cfg = self.cfg
        a = cfg.algorithm
        n = a.num_generations
        step = self.step_idx + 1
        t0 = time.perf_counter()
        info: dict = {}
        failed = False
        try:  # one rollout for every environment: it samples each turn, the env answers and scores it
            batch, trunc, info, rows, group = self._draw(cfg.train.batch_size // n)
        except RuntimeError as exc:
            # Diverged weights (finite but huge) first show here: torch.multinomial refuses
            # inf/nan probabilities. Not skippable: the weights themselves are broken.
            if "probability tensor contains" not in str(exc):
                raise
            failed = True
        if self.dist is not None:
            failed = self.dist.any(failed)  # every process stops, not only the one that sampled the NaN
        if failed:
            raise NonFiniteError(
                f"non-finite logits in the rollout at step {step} (the weights diverged)", "lower train.learning_rate"
            )
        t1 = time.perf_counter()

        t_env = info.pop("time/env")  # the environment answered (and, without Dyna, scored) inside the rollout
        t1 -= t_env
        if a.dynamic_sampling:  # DAPO: replace groups that all scored alike (rl/dynamic_sampling.py)
            extra = {"truncated": 0}

            def draw(k):
                b, tr, _, _, _ = self._draw(k)
                extra["truncated"] += tr
                return b

            batch, more = refill_flat_groups(batch, draw, n, a.dynamic_sampling_max_rounds, self.model.tokenizer.pad_token_id or 0)
            info.update(more)
            trunc += extra["truncated"]
            self.reward_calls += n * more["dynamic/extra_groups"]
            t1 = time.perf_counter() - t_env  # the extra rollouts (and their scoring) count as rollout time
        if self.dyna is not None:  # the true reward on a share, the learned one on the rest (dyna.py)
            t2, n_true = self.dyna.score_batch(self.model, self.env, batch, rows, group, step, info)
            self.reward_calls += n_true
        else:
            t2 = t1 + t_env
            self.reward_calls += info.get("dyna/real_episodes", len(batch))  # imagined episodes cost no real call
        return self.learn(batch, info, times=(t0, t1, t2), truncated=trunc)

    def _draw(self, k: int):
        """Roll out k prompt groups (this process's share of them, data-parallel) from the sampler."""
        cfg, n = self.cfg, self.cfg.algorithm.num_generations
        idx = self.sampler.take(k)
        if self.dist is not None:  # the same prompts on every process: keep this one's contiguous share
            k = len(idx) // self.dist.world_size
            idx = idx[self.dist.rank * k : (self.dist.rank + 1) * k]
        rows = [self.rows[i] for i in idx for _ in range(n)]
        group = [g for g in range(len(idx)) for _ in range(n)]
        def roll(env, rows, group):
            return rollout(self.model, env, rows, group, cfg.generation, max_prompt_tokens=cfg.model.max_prompt_tokens,
                           prompt_field=cfg.data.prompt_field, generator=self.gen, training=True, score=self.dyna is None,
                           engine=self.engine)

        if self.env_dyna is None:
            return (*roll(self.env, rows, group), rows, group)
        pad = self.model.tokenizer.pad_token_id or 0
        return (*self.env_dyna.draw(roll, self.env, rows, group, n, self.step_idx + 1, pad), rows, group)

    def learn(self, batch: Batch, info: dict | None = None, *, times: tuple | None = None, truncated: int = 0) -> StepResult:
        """The stages after the rollout and scoring: reference → rewards → advantages → update → metrics.

        `batch` holds this process's rollouts with their scores; `times` = (start, rollout
        done, scoring done) from `step`. Data-parallel tests call it with given rollouts.
        Dyna's scoring already ran the reference forward (its features come from it).
        """
        cfg = self.cfg
        dist = self.dist
        step = self.step_idx + 1
        info = dict(info or {})
        t0, t1, t2 = times if times is not None else (time.perf_counter(),) * 3
        if batch.ref_logprobs is None:
            batch.ref_logprobs = self.model.reference_logprobs(
                batch.input_ids, batch.attention_mask, batch.n_actions, cfg.generation.temperature
            )
        if wants_recompute(cfg.rollout, self.model):
            recompute_logprobs(self.model, batch, cfg.generation.temperature)
            gap = (batch.logprobs - batch.rollout_logprobs).abs()[batch.action_mask.bool()]
            if gap.numel():  # how far the sampler's log-probs are from the training model's (bf16, vLLM)
                info["rollout/logprob_gap_mean"], info["rollout/logprob_gap_max"] = float(gap.mean()), float(gap.max())
        beta = self.kl_ctl.value
        shape_batch(batch, cfg, beta, dist)
        if self.model.value_norm is not None and batch.returns is not None:
            self._update_value_norm(batch, dist)
        critic_only = self.step_idx < cfg.algorithm.value_warmup_steps
        t3 = time.perf_counter()

        skipped = False
        try:
            bad_reward = _nonfinite(batch.rewards)  # scores are checked by RewardSet; KL and fluency terms are not
            if dist is not None:
                bad_reward = dist.any(bad_reward)
            if bad_reward:
                raise NonFiniteError(f"non-finite reward at step {step} (per-token reward with the KL and fluency terms)")
            fastdecode.release(self.model)  # the update changes the weights they fold: rebuilt at the next sample
            stats = update(self.model, self.opt, batch, cfg.algorithm, loss_fn(cfg, beta, critic_only), self.update_gen, step, dist)
        except NonFiniteError:
            if self.skipped_batches >= cfg.train.skip_nonfinite:
                raise
            # Skip the rest of this batch's update. With several minibatches, the steps
            # already taken on earlier (finite) minibatches stand.
            self.skipped_batches += 1
            self.opt.zero_grad(set_to_none=True)
            skipped, stats = True, {}
        self.sched.step()  # the schedule follows the step count, skipped or not
        t4 = time.perf_counter()

        mask = batch.action_mask
        kl_seq = ((batch.logprobs - batch.ref_logprobs) * mask).sum(-1)
        rows = None
        if dist is None:
            scores, terms, returns, lengths, ended = (
                batch.scores, batch.reward_terms, batch.rewards.sum(-1), batch.lengths, batch.ended
            )
        else:  # every process's rows, in global order, on every process: the metrics are the 1-process ones
            rows, kl_seq, lengths, ended, info, truncated = self._gather(batch, kl_seq, info, truncated)
            scores, terms, returns = rows.scores, rows.reward_terms, torch.tensor(rows.episode_returns)
        self.truncated_prompts += truncated
        if not skipped:  # a skipped batch may carry a NaN KL, which would poison an adaptive β
            self.kl_ctl.update(float(kl_seq.mean()), len(kl_seq))
        self.step_idx += 1
        n_tokens = float(lengths.sum()) if dist is not None else float(mask.sum())
        m = {
            "step": self.step_idx,
            "reward": float(scores.mean()),
            "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
            **{f"reward/{k}": float(v.nanmean()) for k, v in terms.items()},  # Dyna: NaN = scored by the model
            "return": float(returns.mean()),
            "kl": float(kl_seq.mean()),
            "beta": beta,
            **stats,
            "completion_len": float(lengths.mean()),
            "eos_rate": float(ended.float().mean()),
            "lr": self.sched.get_last_lr()[0],
            "skipped_batches": self.skipped_batches,
            "tokens_per_s": n_tokens / max(t4 - t0, 1e-9),
            "time/rollout": t1 - t0,
            "time/reward": t2 - t1,
            "time/reference": t3 - t2,
            "time/update": t4 - t3,
            "time/step": t4 - t0,
        }
        m["reward_calls"] = self.reward_calls
        if cfg.algorithm.value_warmup_steps:
            m["value_warmup"] = float(critic_only)  # 1: only the critic moved this step
        if self.model.value_norm is not None:
            m["value_norm/mean"] = float(self.model.value_norm.mean)
            m["value_norm/std"] = float(self.model.value_norm.std)
        if cfg.algorithm.num_generations > 1:  # groups whose completions all scored alike teach a group baseline nothing
            grp = batch.group if dist is None else torch.arange(len(scores)) // cfg.algorithm.num_generations
            m["groups/zero_std_frac"] = zero_std_groups(scores, grp)
        m.update(info)  # dialog: per-turn rewards, EOS rate per turn, user reply length, simulator time
        if batch.values is not None:
            if dist is None:
                m["explained_variance"] = adv_mod.explained_variance(batch.values, batch.returns, mask)
                m["value_mean"] = float(adv_mod.masked_mean(batch.values, mask))
            else:
                m["explained_variance"] = global_explained_variance(batch.values, batch.returns, mask, dist)
                m["value_mean"] = float(global_masked_mean(batch.values, mask, dist))
        if not skipped:  # a skipped batch's metrics may be NaN; they are logged as such
            for k, v in m.items():
                if isinstance(v, float) and not math.isfinite(v) and k != "explained_variance":
                    raise NonFiniteError(f"non-finite {k} at step {self.step_idx}")
        return StepResult(batch, m, rows)

    def _update_value_norm(self, batch: Batch, dist) -> None:
        """PopArt: move the target statistics to this batch's (every process's) and rescale the head."""
        mask = batch.action_mask
        if dist is None:
            mean, var = adv_mod.masked_mean(batch.returns, mask), adv_mod.masked_var(batch.returns, mask)
        else:
            mean, var = global_masked_mean(batch.returns, mask, dist), global_masked_var(batch.returns, mask, dist)
        self.model.value_norm.update(float(mean), float(var), self.model.value_head)

    def _gather(self, batch: Batch, kl_seq: torch.Tensor, info: dict, truncated: int):
        """Every process's per-row values, concatenated in rank order (= the global batch's order)."""
        mine = {
            "prompts": batch.prompts,
            "completions": batch.completions,
            "scores": batch.scores.tolist(),
            "terms": {k: v.tolist() for k, v in batch.reward_terms.items()},
            "returns": batch.rewards.sum(-1).tolist(),
            "kl": kl_seq.tolist(),
            "lengths": batch.lengths.tolist(),
            "ended": batch.ended.tolist(),
            "info": info,
            "truncated": truncated,
        }
        parts = self.dist.gather(mine)

        def cat(key, sub=None):
            return [v for p in parts for v in (p[key] if sub is None else p[key][sub])]

        rows = Rows(
            cat("prompts"), cat("completions"), torch.tensor(cat("scores")),
            {k: torch.tensor(cat("terms", k)) for k in mine["terms"]}, cat("returns"),
        )
        # dialog diagnostics are means over each process's rows; the shares are equal, so their mean is the global one
        info = {k: (sum(p["info"][k] for p in parts) / len(parts) if isinstance(v, (int, float)) else v) for k, v in info.items()}
        trunc = sum(p["truncated"] for p in parts)
        return rows, torch.tensor(cat("kl")), torch.tensor(cat("lengths")), torch.tensor(cat("ended")), info, trunc


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
