"""Losses and KL estimators as small pure functions over [B, T] tensors and a float mask.

Every loss is a masked mean over valid tokens, so padding never enters a loss.
"""

from __future__ import annotations

import torch

from .advantages import masked_mean


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1", mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from samples of π (Schulman, "Approximating KL divergence", 2020).

    k1 = log π − log π_ref (unbiased, can be negative);
    k3 = (r − 1) − log r with r = π_ref/π (unbiased, always ≥ 0, lower variance).

    Both estimate the *value* of KL(π‖π_ref) without bias; their gradients differ (Tang &
    Munos 2025, "On a few pitfalls in KL divergence gradient estimation for RL"):

    * as a reward (a2c, ppo, rloo: detached, reaching θ through the score function),
      E_π[∇log π · k1] = ∇KL(π‖π_ref), but E_π[∇log π · k3] = ∇KL(π‖π_ref) − ∇KL(π_ref‖π),
      which nearly cancels near the reference. The config refuses k3 there.
    * in the loss (grpo: β·k3 differentiated through log π on on-policy samples),
      E_π[∇k3] = E_π[(1 − π_ref/π)∇log π] = ∇KL(π_ref‖π): grpo's in-loss KL optimises the
      *reverse* (mass-covering) KL, as in DeepSeekMath's GRPO, while its logged `kl` is k1's
      estimate of KL(π‖π_ref). tests/test_losses.py checks all three identities exactly.
    """
    log_ratio = logprobs - ref_logprobs
    if mask is not None:  # zero the masked positions *before* expm1: exp of a huge gap is inf, and inf·0 = nan
        log_ratio = torch.where(mask > 0, log_ratio, torch.zeros_like(log_ratio))
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def aggregate(x: torch.Tensor, mask: torch.Tensor, how: str = "token_mean", max_tokens: int | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar (`algorithm.loss_agg`):

    * token_mean — Σ x·m / Σ m over the minibatch (DAPO's token-level loss; dynalm's default);
    * sequence_mean — the mean over rows of each row's token mean (the GRPO paper, Shao et
      al. 2024, eq. 3: 1/G Σ_i 1/|o_i| Σ_t): a long completion weighs as much as a short one;
    * constant — Σ x·m / (rows × max_tokens) (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-
      Like Training"): no length normalisation, so no bias towards long wrong answers.
    """
    if how == "token_mean":
        return masked_mean(x, mask)
    if how == "sequence_mean":
        return masked_mean(x, mask, dim=-1).mean()
    if how == "constant":
        return (x * mask).sum() / (mask.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}")


def truncated_is_weights(
    logprobs: torch.Tensor, rollout_logprobs: torch.Tensor | None, cap: float | None, mask: torch.Tensor
) -> torch.Tensor | None:
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"): when the rollout engine's log-probs differ from the
    trained model's (another engine, another precision), weight each token's loss by
    min(π_train_old / π_rollout, cap), held fixed. None when off or when there is no
    separate rollout policy."""
    if cap is None or rollout_logprobs is None:
        return None
    w = torch.exp((logprobs - rollout_logprobs).detach()).clamp(max=cap)
    return torch.where(mask > 0, w, torch.zeros_like(w))


def a2c_policy_loss(
    logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *, how: str = "token_mean",
    max_tokens: int | None = None, weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The article's actor loss, done right: −E[A · log π(a|s)] with A held fixed."""
    x = advantages.detach() * logprobs
    if weights is not None:
        x = x * weights
    return -aggregate(x, mask, how, max_tokens)


def value_loss(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The article's critic loss E[(target − V)²], the target held fixed (semi-gradient TD)."""
    return masked_mean((returns.detach() - values) ** 2, mask)


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss: ½·max((V − R)², (clip(V, V_old ± ε) − R)²). Returns (loss, clip fraction)."""
    returns = returns.detach()
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * masked_mean(unclipped, mask), torch.zeros(())
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, frac


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float, *,
    clip_high: float | None = None, level: str = "token", how: str = "token_mean", max_tokens: int | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al., 2017): −E[min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)].

    * token level: ρ_t = π(a_t)/π_old(a_t);
    * `clip_high` — DAPO's clip-higher (Yu et al. 2025): ε_high > ε_low lets unlikely tokens
      grow faster, against entropy collapse; None = symmetric;
    * level "sequence" — GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one
      length-normalised ratio per row, s_i = exp(1/|o_i| Σ_t log(π/π_old)), clipped per row;
      with `how="sequence_mean"` the loss is the paper's −1/G Σ_i min(s_i A_i, clip(s_i) A_i);
    * `weights` — truncated importance weights for an off-policy rollout (held fixed).
    """
    clip_high = clip if clip_high is None else clip_high
    log_ratio = logprobs - old_logprobs
    if level == "sequence":
        seq = masked_mean(log_ratio, mask, dim=-1)  # [B]: mean log-ratio over each row's action tokens
        log_ratio_used = seq[:, None].expand_as(log_ratio)
    elif level == "token":
        log_ratio_used = log_ratio
    else:
        raise ValueError(f"unknown importance sampling level {level!r}")
    ratio = torch.exp(log_ratio_used)
    adv = advantages.detach()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip, 1 + clip_high) * adv
    obj = torch.minimum(surr1, surr2)
    if weights is not None:
        obj = obj * weights
    loss = -aggregate(obj, mask, how, max_tokens)
    with torch.no_grad():
        r_tok = torch.exp(log_ratio)
        stats = {
            # (ρ − 1) − log ρ: the k3 estimate of KL(π_old‖π), as CleanRL logs it (token ratios)
            "approx_kl": masked_mean((r_tok - 1) - log_ratio, mask),
            "clipfrac": masked_mean(((ratio < 1 - clip) | (ratio > 1 + clip_high)).float(), mask),
        }
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(entropy, mask)
