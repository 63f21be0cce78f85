"""One table of algorithms: each entry says how rewards are shaped, how advantages are
estimated, which loss is minimised, whether it needs a critic, and what it refuses.

Adding an algorithm is one `Algorithm(...)` entry here (plus, if it needs one, a loss
function in losses.py with its tests); the trainer reads only this table, through
rl/objectives.py (reward shaping, advantages, the minibatch loss). `dynalm config --help`
and the README list the entries with their one-line summaries.

Plain data, no torch and no config import: the config package validates through `ALGORITHMS`,
and `check` takes the sections it reads (`AlgorithmConfig`, `KLConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    summary: str
    critic: bool  # trains a value head as its baseline (a2c, ppo): model.value_head defaults on
    advantage: str  # critic: TD(0)/GAE on V; group: GRPO; loo: RLOO; returns: whitened returns-to-go (REINFORCE++)
    kl: str  # reward: −β·KL per token in r_t; loss: β·k3 in the loss; sequence: β·KL of the sequence off its score
    loss: str  # pg: −A·log π (no ratio, on-policy); clip: the clipped surrogate (token or sequence ratio)
    value_loss: str = "plain"  # plain: ½… the article's (target − V)²; clipped: PPO's value clip
    default_advantage: str = "gae"  # critic algorithms: td or gae when algorithm.advantage is null
    on_policy_only: bool = False  # one gradient step per batch (a2c)
    needs_group: bool = False  # needs algorithm.num_generations ≥ 2

    def check(self, algo, kl, batch_size: int) -> None:
        """Raise ValueError (the config's one-line error) for settings this algorithm cannot use."""
        if self.needs_group and algo.num_generations < 2:
            raise ValueError(
                f"algorithm.num_generations must be >= 2 for {self.name} (group baselines need several completions per prompt)"
            )
        if self.on_policy_only and (algo.epochs > 1 or (algo.minibatch_size or batch_size) < batch_size):
            # a2c's loss −A·log π has no importance ratio: every gradient step after the first
            # would use samples from a policy that is no longer the current one
            raise ValueError(
                f"{self.name} is on-policy (its loss has no importance ratio): it takes one gradient step per batch; "
                "set algorithm.epochs: 1 and algorithm.minibatch_size: null, or use algorithm.name: ppo"
            )
        if kl.estimator == "k3" and self.kl in ("reward", "sequence"):
            # As a reward, the policy gradient of a per-token estimate k is E_π[∇log π · k]: for
            # k1 that is ∇KL(π‖π_ref), for k3 it is ∇KL(π‖π_ref) − ∇KL(π_ref‖π), which nearly
            # cancels near the reference (tests/test_losses.py checks both on a toy policy).
            raise ValueError(
                f"kl.estimator k3 as a reward gives {self.name} a biased KL gradient; "
                "use kl.estimator: k1 (k3 is right only inside grpo's loss)"
            )
        if self.loss == "pg" and algo.importance_sampling == "sequence":
            raise ValueError(f"algorithm.importance_sampling: sequence needs a ratio; {self.name}'s loss has none (use ppo or grpo)")
        if algo.clip_range_high is not None:
            if self.loss == "pg":
                raise ValueError(f"algorithm.clip_range_high needs a clipped ratio; {self.name}'s loss has none (use ppo or grpo)")
            if algo.clip_range_high < algo.clip_range:
                raise ValueError(
                    f"algorithm.clip_range_high ({algo.clip_range_high}) must be at least clip_range ({algo.clip_range}): "
                    "clip-higher widens the upper side"
                )
        if self.advantage == "returns" and not algo.whiten_advantages:
            raise ValueError(f"{self.name} normalises its advantages over the batch by definition; set algorithm.whiten_advantages: true")
        if algo.dynamic_sampling and not self.needs_group:
            raise ValueError(f"algorithm.dynamic_sampling refills prompt groups of a group baseline (grpo, rloo), not {self.name}")


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("a2c", "the article's actor-critic: A = r + γV(s') − V(s) (TD(0)), loss −A·log π, one on-policy step per batch",
                  critic=True, advantage="critic", kl="reward", loss="pg", default_advantage="td", on_policy_only=True),
        Algorithm("ppo", "PPO (Schulman et al. 2017): GAE on a value head, clipped ratio, clipped value loss, KL in the reward",
                  critic=True, advantage="critic", kl="reward", loss="clip", value_loss="clipped"),
        Algorithm("grpo", "GRPO (Shao et al. 2024): group-normalised sequence advantages, no critic, k3 KL in the loss",
                  critic=False, advantage="group", kl="loss", loss="clip", needs_group=True),
        Algorithm("rloo", "RLOO (Ahmadian et al. 2024): leave-one-out baseline over the group, KL off the sequence score",
                  critic=False, advantage="loo", kl="sequence", loss="clip", needs_group=True),
        Algorithm("reinforce_pp", "REINFORCE++ (Hu 2025): per-token KL in the reward, returns-to-go whitened over the "
                  "global batch, clipped ratio, no critic", critic=False, advantage="returns", kl="reward", loss="clip"),
    )
}


def get(name: str) -> Algorithm:
    return ALGORITHMS[name]
