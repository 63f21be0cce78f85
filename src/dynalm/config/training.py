"""How a run learns and is judged: the algorithm, the training loop, logging, evaluation,
Dyna and the planners."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..rl.algorithms import ALGORITHMS
from .base import _Section


class AlgorithmConfig(_Section):
    name: Literal["a2c", "ppo", "grpo", "rloo", "reinforce_pp"] = Field(
        "ppo", description="Update rule: " + "; ".join(f"{a.name} = {a.summary}" for a in ALGORITHMS.values()) + "."
    )
    advantage: Literal["td", "gae"] | None = Field(
        None, description="Token advantages for a2c/ppo: td = TD(0), gae = GAE(λ); null = td for a2c, gae for ppo."
    )
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ.")
    whiten_advantages: bool = Field(True, description="Normalise advantages over the batch's valid tokens.")
    num_generations: int = Field(1, ge=1, description="Completions per prompt (≥2 for grpo and rloo).")
    epochs: int = Field(1, ge=1, description="Passes over each batch (ppo, grpo, rloo).")
    minibatch_size: int | None = Field(None, ge=1, description="Completions per gradient step; null = the whole batch.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip ε.")
    clip_range_value: float | None = Field(0.2, gt=0, description="Value clip around the rollout value (ppo); null = off.")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    value_target: Literal["gae", "mc"] | None = Field(
        None, description="The critic's regression target: gae = the GAE(λ) return, mc = the Monte-Carlo return (λ = 1); "
        "null = the advantage's own (TD(0) or GAE(λ)) for a2c/ppo, mc for the side critic of grpo/rloo/reinforce_pp."
    )
    value_norm: bool = Field(
        False, description="PopArt: the head predicts the target normalised by running statistics (its outputs preserved "
        "when they move) and the value loss is on that scale, so the critic does not chase the reward's scale."
    )
    value_warmup_steps: int = Field(
        0, ge=0, description="The first N of train.steps fit only the critic on fresh rollouts; the policy does not move "
        "(OpenRLHF's freezing_actor_steps)."
    )
    ent_coef: float = Field(0.0, ge=0, description="Weight of the entropy bonus.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm; null = off.")
    target_kl: float | None = Field(None, gt=0, description="Stop the epochs early when approx_kl exceeds this.")
    scale_rewards: bool = Field(
        True, description="grpo: divide group advantages by the group std (Dr. GRPO recommends false: the std biases "
        "towards groups that are almost all right or all wrong)."
    )
    clip_range_high: float | None = Field(
        None, gt=0, description="Upper ratio clip ε_high (DAPO's clip-higher, e.g. 0.28 with clip_range 0.2); null = clip_range."
    )
    loss_agg: Literal["token_mean", "sequence_mean", "constant"] = Field(
        "token_mean", description="Policy-loss aggregation: token_mean over the minibatch's tokens (DAPO); sequence_mean "
        "of each row's token mean (the GRPO paper); constant = token sum / (rows × max_new_tokens) (Dr. GRPO)."
    )
    importance_sampling: Literal["token", "sequence"] = Field(
        "token", description="Ratio per token (PPO, GRPO) or one length-normalised ratio per sequence, clipped per "
        "sequence (GSPO; use with loss_agg: sequence_mean and a small clip_range such as 0.003–0.004, as the paper)."
    )

    dynamic_sampling: bool = Field(
        False, description="DAPO's dynamic sampling (grpo/rloo): replace prompt groups whose rewards are all equal by new "
        "prompts' groups, up to dynamic_sampling_max_rounds extra rollouts per step (logged as dynamic/*)."
    )
    dynamic_sampling_max_rounds: int = Field(3, ge=1, description="Refill rounds per step at most for dynamic_sampling.")
    overlong_buffer: int | None = Field(
        None, ge=1, description="DAPO's soft overlong penalty: a completion longer than max_new_tokens − buffer tokens loses "
        "overlong_coef × (excess / buffer) on its last token, down to −overlong_coef at max_new_tokens (single-turn); null = off."
    )
    overlong_coef: float = Field(1.0, ge=0, description="Size of the overlong penalty at max_new_tokens.")

    @property
    def needs_value_head(self) -> bool:
        return ALGORITHMS[self.name].critic


class TrainConfig(_Section):
    steps: int = Field(40, ge=0, description="Optimisation steps (one rollout batch each).")
    batch_size: int = Field(8, ge=1, description="Completions per step (prompts per step × num_generations).")
    learning_rate: float = Field(1e-4, gt=0, description="Adam learning rate for the policy.")
    value_learning_rate: float | None = Field(None, gt=0, description="Adam learning rate for the value head; null = same.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="Adam β1, β2.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; null = all cores.")
    skip_nonfinite: int = Field(
        0, ge=0, description="Skip up to this many batches with a NaN/inf loss, gradient or reward (no optimizer step), then stop."
    )
    memory_check: bool = Field(True, description="Refuse to start when the estimated peak memory exceeds the memory available.")
    malloc_mmap_threshold_kb: int | None = Field(
        None, ge=0, le=32768, description="glibc's M_MMAP_THRESHOLD in KiB, set at the start of training: blocks this size or "
        "larger are mapped and unmapped on free, so freed activations go back to the system instead of staying in the "
        "heap (lower peak RSS, slower; 1024 measured best; at most 32768, glibc's cap); null = glibc's dynamic threshold; ignored off glibc.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Keep only each decoder layer's input in the update and recompute the rest in the backward "
        "pass (non-reentrant torch.utils.checkpoint): far less activation memory for about one more forward per update.",
    )
    logits_chunk: int = Field(
        0, ge=0, description="Rows per chunk of the LM head in the update and in the no-grad passes before it "
        "(reference, recompute): each chunk's [rows, tokens, vocab] logits are made, used and freed, and in the update "
        "remade in the backward pass (one more LM-head matmul); 0 = all rows at once.",
    )


class LogConfig(_Section):
    samples_every: int = Field(5, ge=1, description="Write samples.jsonl every N steps.")
    checkpoint_every: int = Field(20, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk.")
    print_episodes: bool = Field(False, description="Print each episode's cumulative reward (the article's log line).")
    report_to: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        ["tensorboard"],
        description="Experiment trackers (TRL's name): each step's metrics, the config, sample tables and, at the end, "
        "the eval and planner tables and the report files. wandb/trackio/mlflow are optional installs; [] = none.",
    )
    project: str = Field("dynalm", min_length=1, description="Tracker project (wandb, trackio) or experiment (mlflow).")
    tensorboard: bool = Field(True, description="Older switch for TensorBoard: false removes it from report_to.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_words(cls, v):
        """TRL's forms too: one name, "a,b", or "none"."""
        if isinstance(v, str):
            return [] if v.strip().lower() == "none" else [w.strip() for w in v.split(",") if w.strip()]
        return v

    @property
    def trackers(self) -> list[str]:
        """report_to without repeats, less TensorBoard where `tensorboard: false`."""
        return [n for n in dict.fromkeys(self.report_to) if n != "tensorboard" or self.tensorboard]
    progress: bool = Field(True, description="Show a live progress bar.")


class EvalConfig(_Section):
    enabled: bool = Field(True, description="Evaluate base vs trained at the end of training.")
    max_prompts: int | None = Field(None, ge=1, description="Use at most this many eval prompts; null = all.")
    batch_size: int = Field(16, ge=1, description="Completions generated at once during eval.")
    samples_per_prompt: int = Field(1, ge=1, description="Completions per eval prompt.")
    seed: int = Field(1234, description="Sampling seed for eval, so base and trained see the same randomness.")
    every: int = Field(
        0, ge=0, description="Also evaluate the policy every N training steps (logged as eval/* in metrics.jsonl); 0 = only at the end."
    )


class DynaConfig(_Section):
    """Dyna: the configured reward is treated as expensive; a learned model scores the rest."""

    enabled: bool = Field(False, description="Score only a share of each step's rollouts with the true reward; a learned reward model scores the rest.")
    true_fraction: float = Field(
        0.25, gt=0, le=1, description="Share of each step's completions scored by the true reward (at least one per step)."
    )
    warmup_steps: int = Field(1, ge=0, description="First steps scored entirely by the true reward, to seed the model's data.")
    model: Literal["features", "lm"] = Field(
        "features",
        description="features: ridge regression on the frozen reference LM's pooled hidden states (no extra forward, exact refit "
        "on all data each step); lm: an LM reward model (LoRA + head, as `dynalm train-rm`) refit by Adam steps.",
    )
    ridge: float | None = Field(
        None, gt=0, description="features: L2 strength; null = picked each refit by leave-one-out error over a grid."
    )
    max_buffer: int = Field(4096, ge=1, description="True scores kept for refitting (oldest dropped first).")
    init: str | None = Field(None, description="lm: start from a reward model saved by `dynalm train-rm` (its folder).")
    fit_steps: int = Field(4, ge=1, description="lm: Adam steps per training step on minibatches of the buffer.")
    fit_batch_size: int = Field(8, ge=1, description="lm: rows per refit step.")
    fit_learning_rate: float = Field(1e-4, gt=0, description="lm: Adam learning rate of the refit.")
    env_model: str | None = Field(
        None, description="Dyna with a learned environment model (multi-turn envs; envmodel/dyna.py): 'online' = learn one "
        "from this run's real transitions, or a `dynalm train-env-model` folder to start from; null = Dyna learns the reward only."
    )
    imagined_fraction: float = Field(
        0.5, ge=0, lt=1, description="env_model: share of each step's episode groups played inside the learned model."
    )
    env_model_base: str | None = Field(None, description="env_model online: its base LM; null = model.name.")
    env_model_fit_steps: int = Field(4, ge=0, description="env_model: Adam steps per training step on the real-transition buffer (0 = fixed).")
    env_model_fit_batch_size: int = Field(8, ge=1, description="env_model: transitions per refit step.")
    env_model_learning_rate: float = Field(3e-4, gt=0, description="env_model: Adam learning rate of the refit.")
    env_model_max_observation_tokens: int = Field(64, ge=1, description="env_model online: observation tokens trained on and written at most.")


class PlannerConfig(_Section):
    """Decode-time planning for `generate` and `eval` (see dynalm.planning)."""

    name: Literal["sample", "greedy", "best-of-n", "mcts", "lookahead"] = Field(
        "sample", description="Decoding: plain sampling, greedy, best-of-n reranking, value-guided token MCTS, or (multi-turn "
        "envs) lookahead: n candidate turns each played `depth` turns inside a learned environment model (planning/lookahead.py)."
    )
    depth: int = Field(2, ge=1, description="lookahead: imagined turns per candidate (the candidate's own included).")
    env_model: str | None = Field(None, description="lookahead: the `dynalm train-env-model` folder to imagine with.")
    n: int = Field(4, ge=1, description="best-of-n: candidates sampled per prompt.")
    rank_by: Literal["reward", "value"] = Field(
        "reward", description="best-of-n: rank candidates by the reward functions, or by the value head alone (no reward call)."
    )
    simulations: int = Field(10, ge=1, description="mcts: simulations (≈ one forward each) before each emitted token.")
    batch_leaves: int = Field(
        1, ge=1, description="mcts: leaves chosen per wave under virtual loss and evaluated in one batched forward (on "
        "generation.fast_decode's path; rollout leaves roll out together). 1 = one simulation at a time."
    )
    top_k: int = Field(10, ge=1, description="mcts: children per node — the policy's k likeliest tokens, priors renormalised.")
    c_puct: float = Field(8.0, ge=0, description="mcts: exploration weight in PUCT, Q + c·P·sqrt(N(s))/(1+N(s,a)).")
    temperature: float = Field(
        0.0, ge=0, description="mcts: 0 = emit the most visited token; >0 = sample it ∝ visits^(1/T)."
    )
    normalize_q: bool = Field(
        True,
        description="mcts: rescale Q to [0, 1] by the lowest and highest leaf score seen in the tree (MuZero), so c_puct "
        "does not depend on the reward's scale.",
    )
    leaf: Literal["value", "reward", "mean", "rollout"] = Field(
        "value",
        description="mcts: how an unfinished leaf is scored — the value head V(s), the run's reward on the partial text "
        "(one reward call per leaf, no value head needed), the mean of the two, or `rollout`: the true reward of one "
        "completion sampled from the leaf (kept in the tree; the search then runs once, before the first token).",
    )
    kl_coef: float | None = Field(
        None,
        ge=0,
        description="mcts: add −kl_coef·Σ(log π − log π_ref) along the path to leaf values (PPO-MCTS); null = the run's own "
        "per-token KL reward (its β for a2c/ppo, 0 for grpo/rloo). env.fluency_coef's term is always added.",
    )
    seed: int = Field(0, description="Seed for the planner's own randomness (sampling, visit-count sampling).")
