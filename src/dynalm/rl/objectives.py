"""The stages of a step that depend on the algorithm — reward shaping, advantages, the
minibatch loss — each read from the algorithm's entry in rl/algorithms.py, never from
its name. The trainer, the per-token view (interpret.py) and the planners' path rewards
all call these, so the β and the advantages they show are the trainer's own.
"""

from __future__ import annotations

from functools import partial

import torch

from ..config import AlgorithmConfig, Config, EnvConfig, KLConfig
from ..distributed import Dist, global_masked_mean, global_masked_var
from . import advantages as adv_mod
from . import losses
from .algorithms import get
from .batch import Batch


# ----------------------------------------------------------------------------- reward shaping


def add_token_rewards(
    batch: Batch, beta: float, *, algorithm: AlgorithmConfig, kl: KLConfig, fluency_coef: float = 0.0,
    max_new_tokens: int,
) -> None:
    """r_t = −β·KL_t (algorithms with KL in the reward) + α·log P_env(a_t|s_t) (α =
    `fluency_coef`, env.fluency_coef), plus the sequence score on the last token
    (multi-turn: each turn's score on that turn's last token) and DAPO's overlong penalty
    (measured against `max_new_tokens`). Action tokens only."""
    a = algorithm
    mask = batch.action_mask
    kl_t = losses.kl_penalty(batch.logprobs, batch.ref_logprobs, kl.estimator, mask) * mask
    rewards = torch.zeros_like(mask)
    if get(a.name).kl == "reward":
        rewards = rewards - beta * kl_t
    if fluency_coef:
        rewards = rewards + fluency_coef * batch.ref_logprobs * mask
    if batch.turn_scores is not None:  # multi-turn: the env placed each turn's score
        rewards = rewards + batch.turn_scores
    else:
        last = (batch.lengths.long() - 1).clamp(min=0)
        rewards[torch.arange(len(batch)), last] += batch.scores
        if a.overlong_buffer:
            pen = overlong_penalty(batch.lengths, max_new_tokens, a.overlong_buffer, a.overlong_coef)
            rewards[torch.arange(len(batch)), last] += pen
            batch.reward_terms["overlong"] = pen.detach().cpu()
    batch.rewards = rewards * mask


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, coef: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max_tokens − buffer,
    then −coef·(L − (max_tokens − buffer))/buffer, reaching −coef at max_tokens."""
    excess = (lengths.float() - (max_tokens - buffer)).clamp(min=0.0)
    return -coef * (excess / buffer).clamp(max=1.0)


def zero_std_groups(scores: torch.Tensor, group: torch.Tensor) -> float:
    """Share of prompt groups whose completions all scored the same: no gradient signal for
    a group baseline (the DAPO paper's motivation for dynamic sampling)."""
    return len(adv_mod.flat_groups(scores, group)) / max(len(group.unique()), 1)


def add_advantages(
    batch: Batch, beta: float, *, algorithm: AlgorithmConfig, kl: KLConfig, turn_gamma: float = 1.0,
    dist: Dist | None = None,
) -> None:
    """Advantages and value targets per the algorithm's entry (see the module docstring);
    `turn_gamma` (env.turn_gamma) discounts between turns of a multi-turn episode; with
    `dist`, whitening uses the whole data-parallel batch's moments."""
    a = algorithm
    algo = get(a.name)
    mask = batch.action_mask
    # Multi-turn: γ between turns is env.turn_gamma (a per-position γ over the action
    # tokens); critic-free sequence advantages weigh turn k's rewards by turn_gamma**k.
    gamma = a.gamma
    weights = None
    if batch.turn_ids is not None:
        gamma = adv_mod.turn_discounts(batch.turn_ids, mask, a.gamma, turn_gamma)
        weights = turn_gamma ** batch.turn_ids.clamp(min=0).to(mask.dtype)
    if algo.advantage == "critic":
        if (a.advantage or algo.default_advantage) == "td":
            batch.advantages, batch.returns = adv_mod.td0(batch.rewards, batch.values, mask, gamma)
        else:
            batch.advantages, batch.returns = adv_mod.gae(batch.rewards, batch.values, mask, gamma, a.lam)
        if a.value_target is not None:  # the critic's target chosen apart from the advantage's
            lam = 1.0 if a.value_target == "mc" else a.lam
            _, batch.returns = adv_mod.gae(batch.rewards, batch.values, mask, gamma, lam)
    elif algo.advantage == "returns":
        # REINFORCE++: the discounted return-to-go of each token (GAE with V = 0, λ = 1), whitened below
        batch.advantages, _ = adv_mod.gae(batch.rewards, torch.zeros_like(mask), mask, gamma, 1.0)
        _side_value_targets(batch, mask, gamma, a)
    else:
        # Critic-free: one number per sequence (multi-turn: per episode), spread over its action tokens.
        seq = batch.rewards.sum(-1) if weights is None else (batch.rewards * weights).sum(-1)
        if algo.kl == "sequence":
            kl_tok = losses.kl_penalty(batch.logprobs, batch.ref_logprobs, kl.estimator, mask) * mask
            seq = seq - beta * (kl_tok.sum(-1) if weights is None else (kl_tok * weights).sum(-1))
        if algo.advantage == "loo":
            per_seq = adv_mod.leave_one_out_advantages(seq, batch.group)
        else:
            per_seq = adv_mod.group_advantages(seq, batch.group, scale=a.scale_rewards)
        batch.advantages = per_seq[:, None] * mask
        _side_value_targets(batch, mask, gamma, a)
        return
    if not a.whiten_advantages:
        return
    if dist is not None:  # whiten with the whole batch's mean and variance
        if float(dist.sum([float(mask.sum())])[0]) > 1:
            moments = (global_masked_mean(batch.advantages, mask, dist), global_masked_var(batch.advantages, mask, dist))
            batch.advantages = adv_mod.whiten(batch.advantages, mask, moments=moments)
    elif mask.sum() > 1:
        batch.advantages = adv_mod.whiten(batch.advantages, mask)


def _side_value_targets(batch: Batch, mask: torch.Tensor, gamma, a) -> None:
    """A value head beside a critic-free update is trained for planning (mcts, best-of-n
    by value): regression on the Monte-Carlo return (GAE with λ = 1), or on the GAE(λ)
    return with `value_target: gae`."""
    if batch.values is not None:
        lam = a.lam if a.value_target == "gae" else 1.0
        _, batch.returns = adv_mod.gae(batch.rewards, batch.values, mask, gamma, lam)
    else:
        batch.returns = batch.advantages.clone()


# ----------------------------------------------------------------------------- the loss


def assistant_turns(env: EnvConfig) -> int:
    """Assistant turns an episode can have: 1 for the text env, the dialog's turn count, a
    custom env's max_turns (Dr. GRPO's constant divides by rows × this × max_new_tokens)."""
    return {"text": 1, "dialog": env.turns}.get(env.kind, env.max_turns)


def _value_loss(model, values, mb: Batch, algo, a, mask) -> tuple[torch.Tensor, torch.Tensor]:
    vclip = torch.zeros(())
    if algo.value_loss == "plain":  # the article's critic loss; the side critic of critic-free algorithms
        vl = losses.value_loss(values, mb.returns, mask)
    else:
        vl, vclip = losses.clipped_value_loss(values, mb.values, mb.returns, mask, a.clip_range_value)
    if model.value_norm is not None:  # PopArt: the error on the normalised scale, ((R − V)/σ)²
        vl = vl / model.value_norm.std**2
    return vl, vclip


def critic_loss(model, mb: Batch, T: int, *, algorithm: AlgorithmConfig) -> tuple[torch.Tensor, dict]:
    """The critic's loss alone (algorithm.value_warmup_steps): the policy's trunk is read
    without gradient, so only the critic moves."""
    a = algorithm
    mask = mb.action_mask
    values = model.critic_values(mb.input_ids, mb.attention_mask, T, detach_trunk=model.critic_kind == "head")
    vl, vclip = _value_loss(model, values, mb, get(a.name), a, mask)
    zero = torch.zeros(())
    parts = dict(policy_loss=zero, value_loss=vl, value_clipfrac=vclip, entropy=zero, approx_kl=zero, clipfrac=zero, kl_loss=zero)
    return a.vf_coef * vl, parts


def minibatch_loss(
    model, mb: Batch, T: int, *, algorithm: AlgorithmConfig, beta: float, temperature: float, max_tokens: int,
    is_cap: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss of one minibatch and its parts, per the algorithm's entry and the variants
    of `algorithm` (loss_agg, clip_range_high, importance_sampling). `temperature` is the
    sampling temperature the log-probs are taken at; `max_tokens` the most action tokens a
    row can hold (Dr. GRPO's constant normaliser: max_new_tokens × assistant turns, see
    `assistant_turns`); `is_cap` is rollout.is_cap (truncated importance sampling)."""
    a = algorithm
    algo = get(a.name)
    mask = mb.action_mask
    out = model(mb.input_ids, mb.attention_mask, n_actions=T, temperature=temperature, entropy_grad=bool(a.ent_coef))
    agg = dict(how=a.loss_agg, max_tokens=max_tokens)
    is_w = losses.truncated_is_weights(mb.logprobs, mb.rollout_logprobs, is_cap, mask)
    clip_hi = a.clip_range_high if a.clip_range_high is not None else a.clip_range
    if algo.loss == "pg":
        pl = losses.a2c_policy_loss(out.logprobs, mb.advantages, mask, **agg, weights=is_w)
        with torch.no_grad():
            _, st = losses.ppo_policy_loss(out.logprobs, mb.logprobs, mb.advantages, mask, a.clip_range)
    else:
        pl, st = losses.ppo_policy_loss(
            out.logprobs, mb.logprobs, mb.advantages, mask, a.clip_range, clip_high=clip_hi,
            level=a.importance_sampling, weights=is_w, **agg,
        )
    loss = pl
    vl = torch.zeros(())
    vclip = torch.zeros(())
    if out.values is not None:
        vl, vclip = _value_loss(model, out.values, mb, algo, a, mask)
        loss = loss + a.vf_coef * vl
    ent = losses.entropy_bonus(out.entropy, mask)
    if a.ent_coef:
        loss = loss - a.ent_coef * ent
    kl_loss = torch.zeros(())
    if algo.kl == "loss" and beta:
        kl_loss = losses.aggregate(losses.kl_penalty(out.logprobs, mb.ref_logprobs, "k3", mask), mask, **agg)
        loss = loss + beta * kl_loss
    parts = {
        "policy_loss": pl,
        "value_loss": vl,
        "value_clipfrac": vclip,
        "entropy": ent,
        "approx_kl": st["approx_kl"],
        "clipfrac": st["clipfrac"],
        "kl_loss": kl_loss,
    }
    return loss, parts


# ----------------------------------------------------------------------------- bound to a run's config


def shape_batch(batch: Batch, cfg: Config, beta: float, dist: Dist | None = None) -> None:
    """The step's per-token rewards and advantages (objectives.add_token_rewards, then
    add_advantages), each given the config sections it reads. The trainer and
    interpret.token_batch both call it, so the per-token view shows the trainer's own numbers."""
    add_token_rewards(batch, beta, algorithm=cfg.algorithm, kl=cfg.kl, fluency_coef=cfg.env.fluency_coef,
                      max_new_tokens=cfg.generation.max_new_tokens)
    add_advantages(batch, beta, algorithm=cfg.algorithm, kl=cfg.kl, turn_gamma=cfg.env.turn_gamma, dist=dist)


def loss_fn(cfg: Config, beta: float, critic_only: bool = False):
    """The update's `loss_fn(model, minibatch, T)`: the algorithm's minibatch loss at the
    step's β, or the critic's loss alone during the value warm-up."""
    if critic_only:
        return partial(critic_loss, algorithm=cfg.algorithm)
    return partial(
        minibatch_loss, algorithm=cfg.algorithm, beta=beta, temperature=cfg.generation.temperature,
        max_tokens=cfg.generation.max_new_tokens * assistant_turns(cfg.env), is_cap=cfg.rollout.is_cap,
    )
