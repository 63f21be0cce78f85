"""The per-token rewards a token search adds along a path, on the scale the run's value head
was trained on (see mcts.py's docstring)."""

from __future__ import annotations

from dataclasses import dataclass

from ..rl.algorithms import ALGORITHMS


@dataclass(frozen=True)
class PathReward:
    """The per-token rewards the search adds along a path: −kl_coef·(log π − log π_ref) + fluency_coef·log π_ref."""

    kl_coef: float = 0.0
    fluency_coef: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef != 0 or self.fluency_coef != 0


def path_reward_for(cfg, model=None) -> PathReward:
    """The run's per-token rewards (objectives.add_token_rewards): β·KL for a2c/ppo with β the
    run's adapted value (`model.trained_beta`, else kl.coef), the environment LM's α·log P_env
    for any algorithm; `planner.kl_coef` replaces the KL coefficient when it is set."""
    kl = cfg.planner.kl_coef
    if kl is None:
        beta = getattr(model, "trained_beta", None)
        kl = (beta if beta is not None else cfg.kl.coef) if ALGORITHMS[cfg.algorithm.name].kl == "reward" else 0.0
    return PathReward(kl_coef=float(kl), fluency_coef=float(cfg.env.fluency_coef))
