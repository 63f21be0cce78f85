"""Losses and KL estimators against plain reference maths."""

import math

import pytest
import torch

from dynalm.rl import losses as L

MASK = torch.tensor([[1.0, 1.0, 0.0]])


def test_a2c_policy_loss_is_minus_mean_adv_times_logp_and_adv_is_detached():
    logp = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 100.0]], requires_grad=True)
    loss = L.a2c_policy_loss(logp, adv, MASK)
    # −(2·−1 + −1·−2)/2 = −(−2 + 2)/2 = 0
    assert loss.item() == pytest.approx(0.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, 0.5, 0.0]]))  # −A/n, padding gets none
    assert adv.grad is None


def test_value_loss_hand():
    v = torch.tensor([[1.0, 0.0, 7.0]])
    ret = torch.tensor([[0.0, 2.0, 0.0]])
    assert L.value_loss(v, ret, MASK).item() == pytest.approx((1 + 4) / 2)


def test_ppo_loss_unclipped_and_clipped():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.5, 0.75, 0.1]]))  # ratios 1.0, 1.5, (pad)
    adv = torch.tensor([[1.0, 1.0, 1.0]])
    loss, st = L.ppo_policy_loss(new, old, adv, MASK, clip=0.2)
    # min(1·1, 1·1) = 1 ; min(1.5, 1.2) = 1.2 → −(1 + 1.2)/2
    assert loss.item() == pytest.approx(-1.1)
    assert st["clipfrac"].item() == pytest.approx(0.5)
    # approx_kl = mean((ρ−1) − log ρ) = (0 + (0.5 − log 1.5))/2
    assert st["approx_kl"].item() == pytest.approx((0.5 - math.log(1.5)) / 2, rel=1e-5)
    # negative advantage: min(ρA, clip(ρ)A) picks the unclipped −1.5
    loss2, _ = L.ppo_policy_loss(new, old, -adv, MASK, clip=0.2)
    assert loss2.item() == pytest.approx((1 + 1.5) / 2)


def test_clipped_value_loss():
    v = torch.tensor([[2.0, 0.0, 0.0]])
    old = torch.tensor([[1.0, 0.0, 0.0]])
    ret = torch.tensor([[3.0, 1.0, 0.0]])
    loss, frac = L.clipped_value_loss(v, old, ret, MASK, clip=0.2)
    # row0: unclipped (2−3)² = 1, clipped V = 1.2 → (1.2−3)² = 3.24 → 3.24; row1: 1 and 1 → 1
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert frac.item() == pytest.approx(0.5)


def test_kl_estimators():
    logp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    assert L.kl_penalty(logp, ref, "k1").item() == pytest.approx(math.log(2))
    # r = 0.25 / 0.5 = 0.5 → (r − 1) − log r = −0.5 + log 2
    assert L.kl_penalty(logp, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    assert L.kl_penalty(ref, ref, "k3").item() == 0.0
    with pytest.raises(ValueError):
        L.kl_penalty(logp, ref, "k9")


def test_k3_is_finite_where_masked():
    """A masked position far from the reference must not turn into inf·0 = nan."""
    logp = torch.tensor([[-1.0, -100.0]])
    ref = torch.tensor([[-1.5, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    k3 = L.kl_penalty(logp, ref, "k3", mask)
    assert torch.isfinite(k3).all() and k3[0, 1] == 0.0
    assert k3[0, 0].item() == pytest.approx(math.expm1(-0.5) + 0.5)


def _toy_policy(scale: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(6, generator=g, dtype=torch.float64)
    theta = (ref_logits + scale * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    return theta, torch.log_softmax(ref_logits, -1)


def _expected_reward_gradient(estimator: str, scale: float = 0.1):
    """E_π[∇log π(a) · k(a)] by enumerating the actions of one categorical step, k detached
    (a per-token reward reaches θ only through the score function)."""
    theta, ref = _toy_policy(scale)
    logp = torch.log_softmax(theta, -1)
    k = L.kl_penalty(logp.detach(), ref, estimator)
    (logp.exp().detach() * k * logp).sum().backward()
    return theta.grad.clone()


def _grad_kl(reverse: bool = False, scale: float = 0.1):
    theta, ref = _toy_policy(scale)
    logp = torch.log_softmax(theta, -1)
    kl = (ref.exp() * (ref - logp)).sum() if reverse else (logp.exp() * (logp - ref)).sum()
    kl.backward()
    return theta.grad.clone()


def test_k1_as_a_reward_has_the_gradient_of_kl_and_k3_does_not():
    """Issue 12.2: the only reward-KL estimator the config allows (k1) has E[∇log π·k] = ∇KL(π‖π_ref)."""
    for scale in (0.1, 1.0):
        assert torch.allclose(_expected_reward_gradient("k1", scale), _grad_kl(False, scale), atol=1e-12)
    g3, gkl = _expected_reward_gradient("k3"), _grad_kl()
    # k3 as a reward: ∇KL(π‖π_ref) − ∇KL(π_ref‖π), far from ∇KL near the reference
    assert torch.allclose(g3, gkl - _grad_kl(reverse=True), atol=1e-12)
    assert torch.nn.functional.cosine_similarity(g3, gkl, dim=0) < 0.5


def test_grpo_in_loss_k3_optimises_the_reverse_kl():
    """Pathwise gradient of β·k3 in the loss, on samples of π: E_π[∇k3] = ∇KL(π_ref‖π)."""
    theta, ref = _toy_policy(0.5)
    logp = torch.log_softmax(theta, -1)
    (logp.exp().detach() * L.kl_penalty(logp, ref, "k3")).sum().backward()
    assert torch.allclose(theta.grad, _grad_kl(reverse=True, scale=0.5), atol=1e-12)
