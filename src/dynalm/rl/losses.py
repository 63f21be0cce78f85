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


def a2c_policy_loss(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The article's actor loss, done right: −E[A · log π(a|s)] with A held fixed."""
    return -masked_mean(advantages.detach() * logprobs, mask)


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
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al., 2017): −E[min(ρA, clip(ρ, 1±ε)A)], ρ = π/π_old."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    surr1 = ratio * adv
    surr2 = ratio.clamp(1 - clip, 1 + clip) * adv
    loss = -masked_mean(torch.minimum(surr1, surr2), mask)
    with torch.no_grad():
        stats = {
            # (ρ − 1) − log ρ: the k3 estimate of KL(π_old‖π), as CleanRL logs it
            "approx_kl": masked_mean((ratio - 1) - log_ratio, mask),
            "clipfrac": masked_mean(((ratio - 1).abs() > clip).float(), mask),
        }
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_mean(entropy, mask)
