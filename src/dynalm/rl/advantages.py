"""Advantage estimators: TD(0), GAE(λ), group-relative (GRPO) and leave-one-out (RLOO).

All token-level tensors are [B, T] with a float `mask` (1 on the action tokens). In a
single-turn batch the mask is a prefix of each row; in a multi-turn dialog it has gaps
(the user's turns and the chat-template tokens between assistant turns). TD(0) and GAE run
over the masked-in positions only: a gap is skipped, so the next value after the last
token of assistant turn k is the value at the first token of turn k+1. Values past a row's
last action token are treated as the terminal state: V = 0.

`gamma` is a float, or a [B, T] tensor whose entry at t is the discount from action t to
the next action of its row (a dialog uses it to discount across turns by `env.turn_gamma`).
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


def whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, moments: tuple | None = None
) -> torch.Tensor:
    """Normalise over the valid tokens; padding stays 0. `moments` = (mean, unbiased var)
    computed elsewhere, e.g. over every process's tokens in a data-parallel run."""
    mean, var = moments if moments is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def next_action_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V at the next masked-in position of each row (0 after its last one), skipping gaps."""
    B, T = values.shape
    v = values * mask
    out = torch.zeros_like(v)
    nxt = torch.zeros(B, dtype=v.dtype, device=v.device)
    for t in reversed(range(T)):
        out[:, t] = nxt
        nxt = torch.where(mask[:, t] > 0, v[:, t], nxt)
    return out


def td0(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma):
    """The article's one-step advantage δ_t = r_t + γV(s_{t+1}) − V(s_t); V = 0 after the end.

    s_{t+1} is the state of the row's next action (masked gaps skipped).
    Returns (advantages, returns) with returns = r_t + γV(s_{t+1}), the TD target.
    """
    v = values * mask
    next_v = next_action_values(values, mask)
    target = (rewards + gamma * next_v) * mask
    return (target - v) * mask, target


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma, lam: float):
    """Generalised advantage estimation (Schulman et al., 2016), backwards over the action tokens.

    A_t = δ_t + γλ·A_{t'} and δ_t = r_t + γV(s_{t'}) − V(s_t), with t' the row's next action
    (masked gaps skipped; none after the last: V = 0, A = 0); returns = A_t + V(s_t), the λ-return.
    """
    v = values * mask
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)  # A at the next action
    next_v = torch.zeros_like(last)  # V at the next action
    scalar = not isinstance(gamma, torch.Tensor)
    for t in reversed(range(T)):
        g = gamma if scalar else gamma[:, t]
        delta = rewards[:, t] + g * next_v - v[:, t]
        a_t = delta + (gamma * lam if scalar else g * lam) * last
        adv[:, t] = a_t
        # Only action positions move the recursion on: a gap (a user turn) or the padding
        # after the end leaves the next action's value and advantage as they were.
        keep = mask[:, t] > 0
        last = torch.where(keep, a_t, last)
        next_v = torch.where(keep, v[:, t], next_v)
    adv = adv * mask
    return adv, (adv + v) * mask


def turn_discounts(turn_ids: torch.Tensor, mask: torch.Tensor, gamma: float, turn_gamma: float) -> torch.Tensor:
    """Per-position discounts for a multi-turn batch: `gamma` from one action token to the
    next within a turn, `turn_gamma` from the last token of turn k to the first of turn k+1."""
    ids = turn_ids.to(mask.dtype)
    nxt = next_action_values(ids + 1.0, mask) - 1.0  # turn of the next action; −1 after the last
    boundary = (mask > 0) & (nxt >= 0) & (nxt != ids)
    out = torch.full_like(mask, float(gamma))
    return torch.where(boundary, torch.full_like(out, float(turn_gamma)), out)


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


def flat_groups(scores: torch.Tensor, group: torch.Tensor) -> list[int]:
    """Ids of the groups (of more than one row) whose scores are all equal: a group baseline
    gives them zero advantage, so no gradient (DAPO's reason for dynamic sampling)."""
    out = []
    for g in group.unique().tolist():
        s = scores[group == g]
        if s.numel() > 1 and float(s.std()) == 0.0:
            out.append(g)
    return out


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
