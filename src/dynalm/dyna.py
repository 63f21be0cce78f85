"""Dyna for language models: train on imagined rewards, refit the reward model on real ones.

The article's answer to its compute challenge (section 7): when the configured reward is
expensive — an LLM judge, a human, a slow metric — each step only a share of the rollouts
is scored by it (the true reward); a learned reward model, refit on every true score
collected so far, scores the rest (Sutton 1990, Dyna; here the learned part is the reward
half of the environment model P(s', r | s, a)).

Two reward models:

* ``features`` (default): ridge regression on pooled hidden states of the frozen reference
  LM — the reference forward that the KL term needs anyway gives them, so imagined scores
  cost no extra forward pass. The fit is exact and deterministic on the whole buffer each
  step (kernel form, n ≤ a few thousand), with the L2 strength picked by the closed-form
  leave-one-out error over a grid unless ``dyna.ridge`` fixes it.
* ``lm``: an LM reward model (LoRA + scalar head, the model of ``dynalm train-rm``, or one
  it saved via ``dyna.init``), refit by a few Adam steps on minibatches of the buffer.

Bookkeeping logged each step: true-reward calls so far, how many scores were imagined, and
the model's error on the newest true scores, predicted *before* the model saw them.
"""

from __future__ import annotations

import math

import torch

from .config import Config, DynaConfig

RIDGE_GRID = tuple(10.0**k for k in range(-3, 5))


def choose_true(n: int, group: list[int], k: int, gen: torch.Generator) -> list[int]:
    """`k` of `n` rollout indices to score with the true reward, random but spread over the
    groups (every group gets one before any gets two), sorted."""
    perm = torch.randperm(n, generator=gen).tolist()
    seen: dict[int, int] = {}
    rank = {}
    for i in perm:
        rank[i] = seen.get(group[i], 0)
        seen[group[i]] = rank[i] + 1
    order = sorted(perm, key=lambda i: rank[i])  # stable: keeps the random order within a rank
    return sorted(order[:k])


def loo_residuals(K, yc, U, S, lam: float, alpha) -> torch.Tensor:
    """Leave-one-out residuals of kernel ridge with an unpenalised intercept, in closed form.

    The fit is ŷ = ȳ + Kα on centred data (K = U diag(S) Uᵀ, the centred kernel), so its hat
    matrix is H = K(K + λI)⁻¹ + 11ᵀ/n: the intercept is a fitted parameter too. The exact
    LOO residual of any such linear smoother is (y_i − ŷ_i) / (1 − H_ii) (Allen's PRESS).
    Leaving out the 1/n part (dividing by 1 − h_ii of the centred kernel alone) sends the
    score to 0 as λ → 0 whenever n ≤ d, since then h_ii → 1 − 1/n: the grid would always
    pick its smallest λ and interpolate noise.
    """
    n = yc.shape[0]
    h = ((U**2) * (S / (S + lam))).sum(1) + 1.0 / n
    return (yc - K @ alpha) / (1.0 - h).clamp(min=1e-9)


class RidgeRewardModel:
    """r̂(x) = ȳ + w·(x − μ)/σ, refit exactly on the whole buffer (kernel ridge, float64)."""

    def __init__(self, ridge: float | None = None):
        self.ridge = ridge
        self.w: torch.Tensor | None = None
        self.mu = self.sd = None
        self.y_mean = 0.0
        self.chosen_ridge: float | None = None

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> None:
        X, y = X.double(), y.double()
        n, d = X.shape
        self.y_mean = float(y.mean())
        if n < 2:
            self.w = torch.zeros(d, dtype=torch.float64)
            self.mu, self.sd = X.mean(0), torch.ones(d, dtype=torch.float64)
            return
        self.mu = X.mean(0)
        self.sd = X.std(0).clamp(min=1e-6)
        Z = (X - self.mu) / self.sd
        yc = y - self.y_mean
        K = Z @ Z.T / d
        S, U = torch.linalg.eigh(K)
        S = S.clamp(min=0.0)
        Uy = U.T @ yc
        grid = [self.ridge] if self.ridge is not None else list(RIDGE_GRID)
        best = None
        for lam in grid:
            alpha = U @ (Uy / (S + lam))
            if len(grid) == 1:
                best = (0.0, lam, alpha)
                break
            err = float((loo_residuals(K, yc, U, S, lam, alpha) ** 2).mean())
            if best is None or err < best[0]:
                best = (err, lam, alpha)
        _, self.chosen_ridge, alpha = best
        self.w = Z.T @ alpha / d

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        if self.w is None:
            return torch.zeros(X.shape[0])
        return (self.y_mean + ((X.double() - self.mu) / self.sd) @ self.w).float()


class Dyna:
    """The buffer of true scores, the learned reward model and the counters of one run."""

    def __init__(self, cfg: Config, combine=None):
        """`combine(terms) -> scores` turns raw reward terms into the sequence score with the
        *current* normalisation statistics (`RewardSet.combine`). With a `normalize: true`
        term the buffer keeps the raw terms and every refit re-scores them with it, so old and
        new targets share one scale; without one, the stored scores are used as they are."""
        self.cfg: DynaConfig = cfg.dyna
        self.run_cfg = cfg
        self.true_calls = 0
        self.imagined = 0
        self.gen = torch.Generator().manual_seed(cfg.seed + 7919)
        # the buffer: features (kind features) or texts (kind lm), and the true scores
        self.features: list[torch.Tensor] = []
        self.prompts: list[str] = []
        self.completions: list[str] = []
        self.targets: list[float] = []
        self.terms: list[dict[str, float]] = []  # raw reward terms per buffered row (renormalising runs only)
        self.combine = combine if any(t.normalize for t in cfg.rewards) else None
        self.ridge = RidgeRewardModel(self.cfg.ridge) if self.cfg.model == "features" else None
        self.lm_model = None
        # a reward model loaded from `dyna.init` was fitted by `train-rm`; otherwise nothing
        # is fitted until the first true scores arrive
        self.fitted = self.cfg.model == "lm" and bool(self.cfg.init)
        # out-of-sample (prediction, truth) pairs of the latest steps, for a steadier error figure
        self.recent: list[tuple[float, float]] = []

    @property
    def needs_features(self) -> bool:
        return self.cfg.model == "features"

    # ------------------------------------------------------------------ which to score
    def n_true(self, n: int, step: int) -> int:
        # an unfitted model would score every imagined row alike (ridge: all zeros), and the
        # group baselines would turn that into advantages: score all rows truly until it is fitted
        if step <= self.cfg.warmup_steps or not self.fitted:
            return n
        return min(n, max(1, round(self.cfg.true_fraction * n)))

    def choose(self, n: int, group: list[int], step: int) -> list[int]:
        return choose_true(n, group, self.n_true(n, step), self.gen)

    # ------------------------------------------------------------------ the model
    def _lm(self):
        if self.lm_model is None:
            from .rewards.learned import RewardModel, RewardModelConfig, load_reward_model

            if self.cfg.init:
                self.lm_model = load_reward_model(self.cfg.init)
            else:
                m = self.run_cfg.model
                rc = RewardModelConfig(
                    model=m.name, lora=True, lora_r=m.lora.r, lora_alpha=m.lora.alpha, data="(online: dyna)",
                    seed=self.run_cfg.seed, device=m.device,
                )
                self.lm_model = RewardModel.build(rc)
        return self.lm_model

    def predict(self, prompts: list[str], completions: list[str], features: torch.Tensor | None) -> list[float]:
        if self.ridge is not None:
            if not self.fitted:
                return [0.0] * len(prompts)
            return self.ridge.predict(features.cpu()).tolist()
        return self._lm().score(prompts, completions)

    def add_and_refit(
        self, prompts: list[str], completions: list[str], features: torch.Tensor | None, scores: list[float],
        terms: dict[str, list[float]] | None = None,
    ) -> None:
        """Append the newest true scores (and, renormalising, their raw terms) to the buffer and refit on all of it."""
        self.prompts += prompts
        self.completions += completions
        self.targets += [float(s) for s in scores]
        if self.combine is not None:
            self.terms += [{k: float(v[i]) for k, v in (terms or {}).items()} for i in range(len(scores))]
        if features is not None:
            self.features += list(features.detach().cpu().float())
        extra = len(self.targets) - self.cfg.max_buffer
        if extra > 0:
            del self.prompts[:extra], self.completions[:extra], self.targets[:extra]
            if self.features:
                del self.features[:extra]
            if self.terms:
                del self.terms[:extra]
        self.refit()

    def fit_targets(self) -> list[float]:
        """The targets of the next refit: the buffer's raw terms re-scored with today's
        normalisation when a term normalises, else the stored scores."""
        if self.combine is None or len(self.terms) != len(self.targets):
            return list(self.targets)
        names = list(self.terms[0]) if self.terms else []
        return list(self.combine({k: [t[k] for t in self.terms] for k in names}))

    def refit(self) -> None:
        if not self.targets:
            return
        targets = self.fit_targets()
        if self.ridge is not None:
            self.ridge.fit(torch.stack(self.features), torch.tensor(targets))
        else:
            c = self.cfg
            self._lm().fit(self.prompts, self.completions, targets, steps=c.fit_steps, batch_size=c.fit_batch_size, lr=c.fit_learning_rate)
        self.fitted = True

    def score_step(
        self, step: int, rows_prompts: list[str], completions: list[str], group: list[int], features, true_score_fn
    ) -> tuple[list[float], list[int], dict, object]:
        """One step's scores: the true reward on the chosen share, the model on the rest.

        `true_score_fn(indices)` scores those rollouts with the true reward (returning the
        RewardSet's ScoredTerms). Returns the scores used for training, the true-scored
        indices, the metrics to log and the ScoredTerms of the true share.
        """
        n = len(completions)
        idx = self.choose(n, group, step)
        scored = true_score_fn(idx)
        true = list(scored.scores)
        scores = [0.0] * n
        metrics: dict = {}
        if len(idx) < n or self.fitted:
            pred = self.predict(rows_prompts, completions, features)
            scores = list(pred)
            if self.fitted:  # the model's error on scores it has not been fit on
                newest = [pred[i] for i in idx]
                metrics.update(error_stats(newest, true))
                self.recent = (self.recent + list(zip(newest, true)))[-64:]
                if len(self.recent) > 2:
                    p, t = zip(*self.recent)
                    rec = error_stats(list(p), list(t))
                    metrics["dyna/model_rmse_recent"] = rec["dyna/model_rmse"]
                    if "dyna/model_corr" in rec:
                        metrics["dyna/model_corr_recent"] = rec["dyna/model_corr"]
        for j, i in enumerate(idx):
            scores[i] = true[j]
        sub_feats = features[idx] if features is not None else None
        self.add_and_refit([rows_prompts[i] for i in idx], [completions[i] for i in idx], sub_feats, true, scored.terms)
        self.true_calls += len(idx)
        self.imagined += n - len(idx)
        metrics.update(
            {
                "dyna/true_calls": self.true_calls,
                "dyna/imagined": self.imagined,
                "dyna/true_this_step": len(idx),
                "dyna/buffer": len(self.targets),
                "reward_true": sum(true) / len(true),
            }
        )
        if self.ridge is not None and self.ridge.chosen_ridge is not None:
            metrics["dyna/ridge"] = self.ridge.chosen_ridge
        return scores, idx, metrics, scored

    # ------------------------------------------------------------------ checkpoint
    def score_batch(self, model, env, batch, rows: list[dict], group: list[int], step: int, info: dict) -> tuple[float, int]:
        """The trainer's scoring stage under Dyna: the reference forward (log-probs + the
        reward model's features), then true scores on a share of `batch` and imagined ones on
        the rest, written into the batch. Returns (the time the scoring began, with the
        reference forward moved out of it — the trainer times it as `time/reference` —, the
        number of true-reward calls)."""
        import time

        from .data import prompt_text

        temp = self.run_cfg.generation.temperature
        t_ref = time.perf_counter()
        if self.needs_features:
            batch.ref_logprobs, feats = model.reference_logprobs_and_features(
                batch.input_ids, batch.attention_mask, batch.n_actions, batch.action_mask, temp
            )
        else:
            batch.ref_logprobs, feats = model.reference_logprobs(batch.input_ids, batch.attention_mask, batch.n_actions, temp), None
        t_score = time.perf_counter()
        ended = batch.ended.tolist()

        def true_score(idx: list[int]):
            return env.step([rows[i] for i in idx], [batch.completions[i] for i in idx], [ended[i] for i in idx], training=True)[1]

        prompts = [prompt_text(r, self.run_cfg.data.prompt_field) for r in rows]
        scores, idx, metrics, scored = self.score_step(step, prompts, batch.completions, group, feats, true_score)
        batch.scores = torch.tensor(scores, dtype=torch.float32, device=batch.action_mask.device)
        # per-term values exist for the true share only; imagined rows carry NaN (logged as such)
        terms = {}
        for k, v in scored.terms.items():
            t = torch.full((len(batch),), float("nan"))
            t[idx] = torch.tensor(v, dtype=torch.float32)
            terms[k] = t
        batch.reward_terms = terms
        info.update(metrics)
        return t_ref + (time.perf_counter() - t_score), len(idx)

    def state_dict(self) -> dict:
        s = {
            "true_calls": self.true_calls,
            "imagined": self.imagined,
            "gen": self.gen.get_state(),
            "prompts": list(self.prompts),
            "completions": list(self.completions),
            "targets": list(self.targets),
            "terms": list(self.terms),
            "features": torch.stack(self.features) if self.features else None,
            "fitted": self.fitted,
            "recent": list(self.recent),
        }
        if self.lm_model is not None:
            m = self.lm_model
            s["lm"] = {
                "weights": m.trainable_state_dict(),
                "opt": m._fit_opt.state_dict() if m._fit_opt is not None else None,
                "fit_gen": m._fit_gen.getstate(),
            }
        return s

    def load_state_dict(self, s: dict) -> None:
        self.true_calls, self.imagined = s["true_calls"], s["imagined"]
        self.gen.set_state(s["gen"])
        self.prompts, self.completions, self.targets = list(s["prompts"]), list(s["completions"]), list(s["targets"])
        self.features = list(s["features"].cpu()) if s["features"] is not None else []
        self.terms = list(s.get("terms", []))  # absent before raw terms were kept
        self.fitted = s["fitted"]
        self.recent = [tuple(x) for x in s.get("recent", [])]
        if "lm" in s:
            m = self._lm()
            m.load_trainable_state_dict(s["lm"]["weights"])
            if s["lm"]["opt"] is not None:
                m._fit_opt = torch.optim.Adam(m.trainable_parameters(), lr=self.cfg.fit_learning_rate)
                m._fit_opt.load_state_dict(s["lm"]["opt"])
            m._fit_gen.setstate(s["lm"]["fit_gen"])
        elif self.ridge is not None and self.fitted:
            # the ridge solution is a deterministic function of the buffer: refit, not stored
            self.ridge.fit(torch.stack(self.features), torch.tensor(self.fit_targets()))


def error_stats(pred: list[float], true: list[float]) -> dict[str, float]:
    """RMSE and (when defined) Pearson correlation of predictions against true scores."""
    n = len(true)
    rmse = math.sqrt(sum((p - t) ** 2 for p, t in zip(pred, true)) / n)
    out = {"dyna/model_rmse": rmse}
    if n > 2:
        mp, mt = sum(pred) / n, sum(true) / n
        cov = sum((p - mp) * (t - mt) for p, t in zip(pred, true))
        vp = sum((p - mp) ** 2 for p in pred)
        vt = sum((t - mt) ** 2 for t in true)
        if vp > 0 and vt > 0:
            out["dyna/model_corr"] = cov / math.sqrt(vp * vt)
    return out
