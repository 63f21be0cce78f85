"""Dyna: which rollouts get the true reward, the ridge reward model, the bookkeeping, and runs."""

import json
import shutil

import pytest
import torch

from dynalm.config import build_config
from dynalm.dyna import RIDGE_GRID, Dyna, RidgeRewardModel, choose_true, error_stats, loo_residuals
from dynalm.rewards import ScoredTerms
from dynalm.run import train

from conftest import tiny_overrides

TIMING = ("time/", "tokens_per_s")


def test_choose_true_spreads_over_groups_and_is_seeded():
    group = [0, 0, 0, 0, 1, 1, 1, 1]
    for seed in range(20):
        idx = choose_true(8, group, 2, torch.Generator().manual_seed(seed))
        assert len(idx) == 2 and idx == sorted(idx)
        assert {group[i] for i in idx} == {0, 1}  # one per group before any group gets two
    a = choose_true(8, group, 3, torch.Generator().manual_seed(5))
    assert a == choose_true(8, group, 3, torch.Generator().manual_seed(5))
    assert choose_true(8, group, 8, torch.Generator().manual_seed(1)) == list(range(8))


def test_ridge_matches_the_primal_closed_form():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 12, generator=g, dtype=torch.float64)
    y = X @ torch.randn(12, generator=g, dtype=torch.float64) + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    lam = 0.5
    m = RidgeRewardModel(ridge=lam)
    m.fit(X, y)
    # primal: w = (ZᵀZ/d + λI)⁻¹ Zᵀ(y − ȳ)/d on standardised Z
    Z = (X - X.mean(0)) / X.std(0)
    d = X.shape[1]
    w = torch.linalg.solve(Z.T @ Z / d + lam * torch.eye(d, dtype=torch.float64), Z.T @ (y - y.mean()) / d)
    Xn = torch.randn(5, 12, generator=g, dtype=torch.float64)
    ref = y.mean() + ((Xn - X.mean(0)) / X.std(0)) @ w
    assert torch.allclose(m.predict(Xn).double(), ref, atol=1e-5)


def test_ridge_leave_one_out_picks_a_fitting_strength():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 8, generator=g)
    y_lin = X @ torch.tensor([1.0, -2.0, 0.5, 0, 0, 0, 0, 3.0])
    m = RidgeRewardModel()
    m.fit(X, y_lin)
    assert m.chosen_ridge <= 1e-2  # noise-free linear data: almost no shrinkage
    assert torch.allclose(m.predict(X), y_lin, atol=0.05)
    noise = torch.randn(60, generator=g)
    m.fit(X, noise)  # pure noise: the mean is the best predictor, so shrink hard
    assert m.chosen_ridge >= 100
    assert float((m.predict(X) - noise.mean()).abs().max()) < 0.3


def test_ridge_closed_form_loo_matches_brute_force_refits():
    """Issue 12.1: the closed-form LOO residuals equal refitting without each row (intercept
    refit too), for n < d, where the old formula (no 1/n in the hat diagonal) was far off."""
    g = torch.Generator().manual_seed(3)
    n, d = 20, 35
    Z = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, generator=g, dtype=torch.float64)
    Zc, yc = Z - Z.mean(0), y - y.mean()
    K = Zc @ Zc.T / d
    S, U = torch.linalg.eigh(K)
    S = S.clamp(min=0.0)
    for lam in (1e-3, 0.1, 10.0):
        alpha = U @ ((U.T @ yc) / (S + lam))
        fast = loo_residuals(K, yc, U, S, lam, alpha)
        brute = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            keep = torch.arange(n) != i
            Zi, yi = Z[keep], y[keep]
            mu, ym = Zi.mean(0), yi.mean()
            w = torch.linalg.solve((Zi - mu).T @ (Zi - mu) / d + lam * torch.eye(d, dtype=torch.float64), (Zi - mu).T @ (yi - ym) / d)
            brute[i] = y[i] - (ym + (Z[i] - mu) @ w)
        assert torch.allclose(fast, brute, atol=1e-8, rtol=0), lam


def test_ridge_on_pure_noise_with_fewer_rows_than_features_shrinks_hard():
    """Issue 12.1: before the fix the grid always returned its smallest λ (1e-3) when n < d,
    and the model interpolated noise (test MSE ≈ 2 against ≈ 1 for the mean)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(60, 100, generator=g), torch.randn(60, generator=g)
    m = RidgeRewardModel()
    m.fit(X, y)
    assert m.chosen_ridge >= 100
    Xt, yt = torch.randn(400, 100, generator=g), torch.randn(400, generator=g)
    mse = float(((m.predict(Xt) - yt) ** 2).mean())
    mse_mean = float(((y.mean() - yt) ** 2).mean())
    assert mse < mse_mean * 1.05
    assert RIDGE_GRID[0] < m.chosen_ridge


def test_error_stats_against_hand_values():
    s = error_stats([1.0, 2.0, 3.0], [1.0, 2.0, 5.0])
    assert s["dyna/model_rmse"] == pytest.approx((4 / 3) ** 0.5)
    # pearson of (1,2,3) and (1,2,5): deviations (−1,0,1), (−5/3,−2/3,7/3): Σ products 4, Σ squares 2 and 26/3
    assert s["dyna/model_corr"] == pytest.approx(4 / (2 * 26 / 3) ** 0.5)


def test_bookkeeping_counts_true_calls_and_refits_on_the_true_share(tiny_llama, prompts_file):
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, dyna={"enabled": True, "true_fraction": 0.25, "warmup_steps": 1},
                                      algorithm={"name": "grpo", "num_generations": 2}, train={"batch_size": 8}))
    dyna = Dyna(cfg)
    group = [i // 2 for i in range(8)]
    calls = []
    g = torch.Generator().manual_seed(0)

    def true_fn(idx):
        calls.append(list(idx))
        return ScoredTerms({"t": [float(i) for i in idx]}, [float(i) for i in idx])

    prompts = [f"p{i}" for i in range(8)]
    comps = [f"c{i}" for i in range(8)]
    feats = torch.randn(8, 6, generator=g)
    # step 1 (warm-up): everything true, nothing imagined
    scores, idx, m, _ = dyna.score_step(1, prompts, comps, group, feats, true_fn)
    assert idx == list(range(8)) and scores == [float(i) for i in range(8)]
    assert (m["dyna/true_calls"], m["dyna/imagined"], m["dyna/buffer"]) == (8, 0, 8)
    assert "dyna/model_rmse" not in m  # nothing was predicted out of sample yet
    # step 2: two true scores; the other six come from the model fit on step 1's data
    expected_pred = dyna.ridge.predict(feats).tolist()
    scores, idx, m, _ = dyna.score_step(2, prompts, comps, group, feats, true_fn)
    assert len(idx) == 2 and calls[-1] == idx
    for i in range(8):
        assert scores[i] == (float(i) if i in idx else pytest.approx(expected_pred[i]))
    assert (m["dyna/true_calls"], m["dyna/imagined"], m["dyna/true_this_step"], m["dyna/buffer"]) == (10, 6, 2, 10)
    assert m["dyna/model_rmse"] == pytest.approx(error_stats([expected_pred[i] for i in idx], [float(i) for i in idx])["dyna/model_rmse"])
    # the refit used exactly the true-scored rows
    assert dyna.targets == [float(i) for i in range(8)] + [float(i) for i in idx]
    assert torch.equal(torch.stack(dyna.features[8:]), feats[idx])
    fresh = RidgeRewardModel()
    fresh.fit(torch.stack(dyna.features), torch.tensor(dyna.targets))
    assert torch.allclose(fresh.predict(feats), dyna.ridge.predict(feats))


def test_warmup_zero_scores_every_row_truly_until_the_model_is_fitted(tiny_llama, prompts_file):
    """Issue 12.5: with warmup_steps 0 the first step used to score 6 of 8 rows with an
    unfitted model (all zeros), which grpo turned into advantages."""
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, dyna={"enabled": True, "true_fraction": 0.25, "warmup_steps": 0},
                                      algorithm={"name": "grpo", "num_generations": 2}, train={"batch_size": 8}))
    dyna = Dyna(cfg)
    group = [i // 2 for i in range(8)]

    def true_fn(idx):
        return ScoredTerms({"t": [1.0 + i for i in idx]}, [1.0 + i for i in idx])

    feats = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    names = [f"x{i}" for i in range(8)]
    scores, idx, m, _ = dyna.score_step(1, names, names, group, feats, true_fn)
    assert idx == list(range(8)) and scores == [1.0 + i for i in range(8)]
    assert m["dyna/imagined"] == 0
    _, idx, m, _ = dyna.score_step(2, names, names, group, feats, true_fn)  # fitted now: the share applies
    assert len(idx) == 2 and m["dyna/imagined"] == 6


def test_normalised_terms_are_refit_on_one_scale(tiny_llama, prompts_file):
    """Issue 12.6: a `normalize: true` term used to be stored normalised by the running
    statistics of its own step, so a refit mixed scales. Now the buffer keeps the raw term
    and each refit normalises all of it with the current statistics."""
    from dynalm.rewards import RewardSet

    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, dyna={"enabled": True, "warmup_steps": 2},
                                      rewards=[{"name": "length", "normalize": True}],
                                      algorithm={"name": "grpo", "num_generations": 2}, train={"batch_size": 4}))
    rs = RewardSet(cfg.rewards)
    dyna = Dyna(cfg, combine=rs.combine)
    feats = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    raw = []
    for step, words in ((1, [1, 2, 3, 4]), (2, [20, 30, 40, 50])):
        comps = [" ".join(["w"] * k) for k in words]

        def true_fn(idx, comps=comps):
            return rs([""] * len(idx), [comps[i] for i in idx], update_stats=True)

        dyna.score_step(step, [""] * 4, comps, [0, 0, 1, 1], feats, true_fn)
        raw += rs([""] * 4, comps).terms["length"]
    t = torch.tensor(raw, dtype=torch.float64)
    expected = ((t - t.mean()) / (t.std() + 1e-8)).tolist()
    assert dyna.fit_targets() == pytest.approx(expected, abs=1e-9)
    assert dyna.ridge.y_mean == pytest.approx(0.0, abs=1e-6)  # one scale: the normalised buffer has mean 0
    # the checkpoint keeps the raw terms, and a reloaded model is the same fit
    again = Dyna(cfg, combine=rs.combine)
    again.load_state_dict(dyna.state_dict())
    assert torch.allclose(again.ridge.predict(feats), dyna.ridge.predict(feats))


def _metrics(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.parametrize("normalize", [False, True])
def test_tiny_dyna_run_through_the_cli_and_resume(tiny_llama, prompts_file, tmp_path, capsys, normalize):
    """With a normalised term, the resumed refit must see the restored reward statistics
    (they used to be restored after Dyna, so the refit on load used fresh ones)."""
    import yaml

    from dynalm.cli import main

    extra = {"rewards": [{"name": "length", "normalize": True}]} if normalize else {}
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2}, **extra,
                          dyna={"enabled": True, "true_fraction": 0.25}, train={"steps": 4, "batch_size": 4},
                          eval={"every": 2, "max_prompts": 4}, log={"samples_every": 1, "checkpoint_every": 2})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    run = tmp_path / "full"
    assert main(["train", "-c", str(p), "--out", str(run)]) == 0
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # warm-up step: 4 true calls; then one per step (round(0.25 · 4))
    assert [m["dyna/true_this_step"] for m in ms] == [4, 1, 1, 1]
    assert [m["reward_calls"] for m in ms] == [4, 5, 6, 7]
    assert [m["dyna/imagined"] for m in ms] == [0, 3, 6, 9]
    assert "eval/reward" in ms[1] and "eval/reward" not in ms[0] and "eval/kl" in ms[1]
    assert all("dyna/model_rmse" in m for m in ms[1:])
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert sum(s.get("scored_by") == "model" for s in samples if s["step"] == 2) == 3
    term = "length" if normalize else "distinct1"
    assert all(term in s for s in samples if s["step"] == 1)

    # resume after step 3's metrics but from the step-2 checkpoint: same metrics as unbroken
    part_over = {**over, "train": {**over["train"], "steps": 3}}
    part = train(build_config(part_over), tmp_path / "part", echo=lambda s: None)
    shutil.rmtree(part / "checkpoints" / "step-000003")
    (part / "checkpoints" / "latest").write_text("step-000002\n")
    (part / "config.yaml").write_text((part / "config.yaml").read_text().replace("steps: 3", "steps: 4"))
    train(None, resume=part, echo=lambda s: None)
    assert _metrics(part) == _metrics(run)


def test_plain_runs_count_reward_calls(tiny_llama, prompts_file, tmp_path):
    run = train(build_config(tiny_overrides(tiny_llama, prompts_file, eval={"enabled": False})), tmp_path / "r", echo=lambda s: None)
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward_calls"] for m in ms] == [4, 8]
    assert not any(k.startswith("dyna/") for k in ms[0])


def test_dyna_with_an_lm_reward_model(tiny_llama, prompts_file, tmp_path):
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                          dyna={"enabled": True, "model": "lm", "fit_steps": 2, "fit_batch_size": 2},
                          train={"steps": 3, "batch_size": 4}, eval={"enabled": False})
    run = train(build_config(over), tmp_path / "r", echo=lambda s: None)
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["dyna/true_calls"] for m in ms] == [4, 5, 6]
    state = torch.load(run / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert state["dyna"]["targets"] and any("lora" in k for k in state["dyna"]["lm"]["weights"])


def test_dyna_refuses_dialog():
    from dynalm.errors import UserError

    with pytest.raises(UserError, match="dyna learns the reward of single-turn tasks .* set dyna.env_model"):
        build_config({"env": {"kind": "dialog"}, "dyna": {"enabled": True}})


def test_reference_features_come_with_the_reference_logprobs(tiny_llama, prompts_file):
    from dynalm.models.policy import PolicyValueModel

    cfg = build_config(tiny_overrides(tiny_llama, prompts_file))
    model = PolicyValueModel.from_config(cfg)
    ids = torch.tensor([[0, 5, 6, 7, 8, 9, 10], [2, 5, 6, 7, 8, 11, 0]])
    attn = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]])
    amask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lp, feats = model.reference_logprobs_and_features(ids, attn, 3, amask)
    assert torch.equal(lp, model.reference_logprobs(ids, attn, 3))
    hidden = model.lm.config.hidden_size
    assert feats.shape == (2, 3 * hidden)
    # row 1: its last completion token is position −2 (the final column is padding)
    with torch.no_grad(), model.reference() as ref:
        h = ref(input_ids=ids, attention_mask=attn, output_hidden_states=True,
                position_ids=(attn.cumsum(-1) - 1).clamp(min=0)).hidden_states[-1]
    assert torch.allclose(feats[1, hidden : 2 * hidden], h[1, -2], atol=1e-5)
    assert torch.allclose(feats[1, :hidden], h[1, -3:-1].mean(0), atol=1e-5)
