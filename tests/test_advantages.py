"""Advantage estimators against values worked out by hand."""

import pytest
import torch

from dynalm.rl import advantages as A


def test_td0_hand_values_with_padding():
    # one row of 3 real tokens + 1 pad; γ = 0.5
    r = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    v = torch.tensor([[0.2, 0.4, 0.6, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = A.td0(r, v, m, gamma=0.5)
    # δ0 = 0 + .5*.4 - .2 = 0 ; δ1 = 0 + .5*.6 - .4 = -.1 ; δ2 = 1 + .5*0 - .6 = .4 (terminal: V=0)
    assert torch.allclose(adv, torch.tensor([[0.0, -0.1, 0.4, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.2, 0.3, 1.0, 0.0]]))


def test_gae_hand_values():
    r = torch.tensor([[0.0, 1.0, 0.0]])
    v = torch.tensor([[0.5, 0.5, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    adv, ret = A.gae(r, v, m, gamma=1.0, lam=0.5)
    # δ1 = 1 + 0 - .5 = .5 ; δ0 = 0 + .5 - .5 = 0 ; A1 = .5 ; A0 = 0 + .5*.5 = .25
    assert torch.allclose(adv, torch.tensor([[0.25, 0.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.75, 1.0, 0.0]]))


def test_gae_lambda_one_is_monte_carlo_return_minus_value():
    r = torch.tensor([[0.1, 0.2, 0.3, 0.0]])
    v = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = A.gae(r, v, m, gamma=1.0, lam=1.0)
    assert torch.allclose(ret, torch.tensor([[0.6, 0.5, 0.3, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[-0.4, -1.5, -2.7, 0.0]]))


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.5])
def test_td0_equals_gae_with_lambda_zero(gamma):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(5, 7, generator=g)
    v = torch.randn(5, 7, generator=g)
    lengths = torch.tensor([7, 3, 1, 5, 6])
    m = (torch.arange(7)[None] < lengths[:, None]).float()
    a1, r1 = A.td0(r * m, v, m, gamma)
    a2, r2 = A.gae(r * m, v, m, gamma, 0.0)
    assert torch.allclose(a1, a2, atol=1e-6)
    assert torch.allclose(r1, r2, atol=1e-6)


def test_padding_never_changes_real_positions():
    r = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    v = torch.tensor([[0.3, 0.2, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    a_short, _ = A.gae(r[:, :2], v[:, :2], m[:, :2], 0.9, 0.8)
    v_junk = v.clone()
    v_junk[:, 2:] = 100.0  # garbage values on padding
    a_long, _ = A.gae(r, v_junk, m, 0.9, 0.8)
    assert torch.allclose(a_long[:, :2], a_short)
    assert torch.all(a_long[:, 2:] == 0)


def test_whiten_uses_only_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = A.whiten(x, m)
    # mean 2, unbiased var 1 → (x − 2) / 1
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4)


def test_group_advantages_grpo():
    s = torch.tensor([1.0, 3.0, 10.0, 10.0])
    g = torch.tensor([0, 0, 1, 1])
    adv = A.group_advantages(s, g, scale=True, eps=0.0)
    # group 0: mean 2, std (unbiased) sqrt(2) → ∓1/sqrt(2); group 1: all equal → 0
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]) / 2**0.5)
    assert torch.allclose(adv[2:], torch.zeros(2))
    assert torch.allclose(A.group_advantages(s, g, scale=False), torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_leave_one_out():
    s = torch.tensor([1.0, 2.0, 6.0])
    g = torch.zeros(3, dtype=torch.long)
    # 1 − (2+6)/2 = −3 ; 2 − (1+6)/2 = −1.5 ; 6 − 1.5 = 4.5
    assert torch.allclose(A.leave_one_out_advantages(s, g), torch.tensor([-3.0, -1.5, 4.5]))


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert A.explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert A.explained_variance(torch.full_like(ret, 2.0), ret, m) == pytest.approx(0.0)
