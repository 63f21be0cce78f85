"""Advantage estimators: TD(0), GAE(λ), group-relative (GRPO) and leave-one-out (RLOO).

All token-level tensors are [B, T] with a float `mask` (1 on real completion tokens,
which form a prefix of each row). Values past a row's last real token are treated as
the terminal state: V = 0.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var  # unbiased, as numpy's ddof=1


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise over the valid tokens; padding stays 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def td0(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float):
    """The article's one-step advantage δ_t = r_t + γV(s_{t+1}) − V(s_t); V = 0 after the end.

    Returns (advantages, returns) with returns = r_t + γV(s_{t+1}), the TD target.
    """
    v = values * mask
    next_v = torch.zeros_like(v)
    next_v[:, :-1] = v[:, 1:]
    target = (rewards + gamma * next_v) * mask
    return (target - v) * mask, target


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al., 2016), backwards over tokens.

    A_t = Σ_k (γλ)^k δ_{t+k};  returns = A_t + V(s_t) (the λ-return).
    """
    v = values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last * (mask[:, t + 1] if t + 1 < T else 0.0)
        adv[:, t] = last
    adv = adv * mask
    return adv, (adv + v) * mask


def group_advantages(scores: torch.Tensor, group: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al., 2024): (score − mean of its group) / (std of its group), per sequence."""
    adv = torch.zeros_like(scores)
    for g in group.unique():
        idx = group == g
        s = scores[idx]
        a = s - s.mean()
        if scale and s.numel() > 1:
            std = s.std(unbiased=True)
            a = a / (std + eps) if std > 0 else torch.zeros_like(a)  # a group that agrees teaches nothing
        adv[idx] = a
    return adv


def leave_one_out_advantages(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al., 2024): score minus the mean of the other completions of its prompt."""
    adv = torch.zeros_like(scores)
    for g in group.unique():
        idx = group == g
        s = scores[idx]
        k = s.numel()
        adv[idx] = s - (s.sum() - s) / (k - 1) if k > 1 else s - s
    return adv


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 − Var[returns − V] / Var[returns] over valid tokens (CleanRL's diagnostic)."""
    var_y = masked_var(returns, mask)
    if var_y <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask) / var_y)
