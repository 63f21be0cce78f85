"""Typed configuration for a whole run.

YAML in, validated by pydantic, unknown keys rejected with the closest valid key
suggested. Every field carries one line of documentation. The config is never
mutated after validation: code that needs a derived value computes it.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError
from .rl.algorithms import ALGORITHMS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class LoraConfig(_Section):
    enabled: bool = Field(True, description="Train a LoRA adapter (reference policy = adapter off) instead of all weights.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    target_modules: list[str] | str | None = Field(
        None, description="Module names to adapt; null picks the attention projections of the architecture."
    )


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Hub id, local directory, local .gguf file, or the embedded default 'smollm2-135m-instruct'.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings.")
    value_head: bool | None = Field(
        None,
        description="Add a value head; null = only when the algorithm needs one (a2c, ppo). With grpo/rloo it is "
        "trained on the Monte-Carlo return, for planning.",
    )
    critic: Literal["head", "adapter", "model"] = Field(
        "head", description="Where the value head reads its features: head = the policy's last hidden layer (the article's "
        "form); adapter = a second LoRA adapter on the same frozen base (needs lora.enabled); model = a separate model, "
        "critic_model or critic_init (PPO-MCTS, OpenRLHF)."
    )
    critic_model: str | None = Field(
        None, description="critic: model — its LM (same forms as name, same tokenizer as the policy); null = a copy of name."
    )
    critic_init: str | None = Field(
        None, description="critic: model — start it from a `dynalm train-rm` output folder (its trunk, adapter and head)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run; auto = cuda if available.")
    use_chat_template: bool = Field(True, description="Wrap prompts in the tokenizer's chat template when it has one.")
    system_prompt: str | None = Field(None, description="System message for chat templates; null = the template's default.")
    max_prompt_tokens: int = Field(256, ge=8, description="Prompts longer than this are truncated from the left (with a warning).")


class DataConfig(_Section):
    train: str | None = Field(
        "builtin:story_train",
        description="Training prompts: 'builtin:NAME', a JSONL/CSV file, a `datasets` save_to_disk folder, or 'hf:NAME[:CONFIG]'.",
    )
    eval: str | None = Field("builtin:story_eval", description="Held-out prompts for eval; same forms as `train`.")
    train_split: str = Field("train", description="Split of a `datasets` source used for training.")
    eval_split: str = Field("test", description="Split of a `datasets` source used for eval.")
    reference_field: str | None = Field(
        None, description="Row field passed to reward functions as `reference` (e.g. a translation's target)."
    )
    prompts: list[str] | None = Field(None, description="Inline training prompts; overrides `train` when set.")
    prompt_field: str = Field("prompt", description="Field of each row holding the prompt.")
    template: str = Field("{prompt}", description="Text shown to the model; `{prompt}` and any row field can be used.")
    shuffle: bool = Field(True, description="Shuffle the training prompts each pass (seeded).")


class GenerationConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, description="Tokens sampled per completion at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; log-probs are taken at this temperature too.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (0 = off).")
    stop_at_eos: bool = Field(True, description="End a completion at the tokenizer's EOS token.")
    fast_decode: bool = Field(
        True, description="Decode Llama-family models (Llama, Qwen2) with LoRA folded into the weights and a static KV "
        "cache (same maths, less per-token overhead); other models keep transformers' path. false = always transformers'.",
    )
    share_prefixes: bool = Field(
        True, description="Prefill each distinct prompt of a batch once (a grpo/rloo group, best-of-n candidates) and "
        "give its KV cache to every row that starts with it; false = one prefill per row.",
    )


class RolloutConfig(_Section):
    recompute_logprobs: bool | None = Field(
        None,
        description="Take π_old (and V_old) from a no-grad training forward after the rollout instead of the KV-cache "
        "decode (TRL's way): under bf16 the two use different kernels, so PPO's first ratio is not 1; null = on on CUDA, off on CPU.",
    )
    is_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling: weight each token's loss by min(π_old/π_rollout, cap) when "
        "π_old is recomputed (recompute_logprobs) and the sampler's log-probs differ; null = off."
    )


class RewardTerm(_Section):
    name: str = Field(..., description="Built-in reward name, 'file.py:function' or 'package.module:function'.")
    weight: float = Field(1.0, description="Weight of this term in the sequence score.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the function.")
    alias: str | None = Field(None, description="Name used in logs; defaults to the function name.")
    normalize: bool = Field(False, description="Standardise this term by its running mean/std over training (logged raw).")
    clip: float | None = Field(None, gt=0, description="Clip this term (after normalising) to [−clip, clip]; null = off.")


class KLConfig(_Section):
    coef: float = Field(0.05, ge=0, description="β: weight of the KL penalty to the reference policy.")
    estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="KL estimator of the reward penalty (a2c, ppo, rloo): k1 = log π − log π_ref, the only one whose policy gradient "
        "is ∇KL(π‖π_ref); k3 is refused there (grpo's in-loss KL is always k3, see rl/losses.py).",
    )
    adaptive: bool = Field(False, description="Adapt β toward `target` (Ziegler et al. 2019).")
    target: float = Field(6.0, gt=0, description="Target KL per sequence (nats) for the adaptive controller.")
    horizon: int = Field(10000, ge=1, description="Horizon of the adaptive controller, in samples.")


DEFAULT_USER_INSTRUCTIONS = (
    "You are role-playing a person chatting with an AI assistant. {persona} {goal} "
    "Stay in character and keep to your goal: do not praise or flatter the assistant; if its reply "
    "does not help with your goal, say so and ask again. "
    "Write only your next message to the assistant: one or two short sentences."
)


def _user_generation_default() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=32, temperature=0.7, top_p=0.9)


class EnvConfig(_Section):
    fluency_coef: float = Field(
        0.0,
        description="α: per-token reward α·log P_env(a_t|s_t) from the frozen environment LM (the reference policy); 0 = off.",
    )
    kind: Literal["text", "dialog", "custom", "model"] = Field(
        "text",
        description="Environment: single-turn text completion, a multi-turn dialog with a simulated user (envs/dialog.py), "
        "`custom`: your own gymnasium-style text environment from `env.factory` (envs/custom.py), or `model`: an "
        "environment model trained by `dynalm train-env-model`, from `env.path` (envs/model.py).",
    )
    path: str | None = Field(None, description="model: the folder `dynalm train-env-model` wrote.")
    factory: str | None = Field(
        None, description="custom: 'file.py:name' or 'package.module:name', a class or a function returning one env instance."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="custom: keyword arguments for the factory.")
    max_turns: int = Field(8, ge=1, description="custom, model: assistant turns per episode at most; a longer episode is cut (truncated).")
    rewards_on: Literal["turn", "episode"] = Field(
        "episode",
        description="custom, model: the configured reward terms score every assistant turn, or only the episode's last one "
        "(either way added to the env's own step reward, logged as reward/env).",
    )
    turns: int = Field(3, ge=1, description="dialog: assistant turns per episode (the simulated user answers each one).")
    user_model: str = Field(
        "reference",
        description="dialog: the user-simulator LM: 'reference' = the policy's own frozen reference (no extra memory), or a model name as in model.name.",
    )
    turn_gamma: float = Field(
        0.95, ge=0, le=1, description="dialog: discount between consecutive assistant turns (γ across turns; algorithm.gamma applies within a turn)."
    )
    user_generation: GenerationConfig = Field(
        default_factory=_user_generation_default, description="dialog: sampling settings of the user simulator's replies."
    )
    user_instructions: str = Field(
        DEFAULT_USER_INSTRUCTIONS,
        description="dialog: the user simulator's system message; {persona}, {goal} and any other row field are filled in (missing ones empty).",
    )
    user_max_prompt_tokens: int = Field(
        1024, ge=8, description="dialog: user-simulator prompts longer than this are cut from the left."
    )
    transcripts: int = Field(
        8, ge=0, description="dialog: eval episodes per side (base, trained) written to transcripts.jsonl in the run directory."
    )
    record_transitions: bool = Field(
        False, description="Write every training and eval episode's transitions (state, action, next observation, reward, "
        "terminated/truncated, token counts) to transitions.jsonl in the run directory, to learn an environment model from."
    )

    @field_validator("user_instructions")
    @classmethod
    def _instructions_format(cls, v: str) -> str:
        from collections import defaultdict

        try:
            v.format_map(defaultdict(str))
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"is not a valid template ({exc}): name row fields as {{persona}}, write literal braces as {{{{ }}}}"
            ) from None
        return v


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
    gradient_checkpointing: bool = Field(
        False, description="Keep only each decoder layer's input in the update and recompute the rest in the backward "
        "pass (non-reentrant torch.utils.checkpoint): far less activation memory for about one more forward per update.",
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


class Config(_Section):
    seed: int = Field(0, description="Seed for python, numpy and torch.")
    task: str = Field("custom", description="Task preset name (informational; presets live in configs/).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rewards: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="distinct2")])
    kl: KLConfig = Field(default_factory=KLConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    planner: PlannerConfig = Field(default_factory=PlannerConfig)
    dyna: DynaConfig = Field(default_factory=DynaConfig)

    @model_validator(mode="before")
    @classmethod
    def _custom_env_defaults(cls, raw):
        """A custom environment brings its own episodes and reward: unless the config says
        otherwise, no data files (episodes are reset by seed) and no extra reward terms."""
        if isinstance(raw, dict) and isinstance(raw.get("env"), dict) and raw["env"].get("kind") in ("custom", "model"):
            raw = dict(raw)
            raw.setdefault("rewards", [])
            data = dict(raw.get("data") or {})
            data.setdefault("train", None)
            data.setdefault("eval", None)
            raw["data"] = data
        return raw

    @model_validator(mode="after")
    def _check_invariants(self) -> "Config":
        algo = self.algorithm
        entry = ALGORITHMS[algo.name]
        if entry.needs_group and algo.num_generations < 2:
            entry.check(algo, self.kl, self.train.batch_size)  # the group message first, as before
        if self.train.batch_size % algo.num_generations:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of algorithm.num_generations ({algo.num_generations})"
            )
        if algo.needs_value_head and self.model.value_head is False:
            raise ValueError(f"algorithm {algo.name} needs a value head but model.value_head is false")
        m = self.model
        if m.critic != "head" and not self.use_value_head:
            raise ValueError(f"model.critic '{m.critic}' needs a value head (set model.value_head: true, or use a2c/ppo)")
        if m.critic == "adapter" and not m.lora.enabled:
            raise ValueError("model.critic 'adapter' is a second LoRA adapter: it needs model.lora.enabled: true")
        if (m.critic_model or m.critic_init) and m.critic != "model":
            raise ValueError("model.critic_model and model.critic_init need model.critic: model")
        if m.critic_model and m.critic_init:
            raise ValueError("give model.critic_model or model.critic_init, not both (critic_init brings its own model)")
        if (algo.value_norm or algo.value_warmup_steps) and not self.use_value_head:
            raise ValueError("algorithm.value_norm and value_warmup_steps train a critic: set model.value_head: true")
        if algo.minibatch_size is not None and algo.minibatch_size > self.train.batch_size:
            raise ValueError("algorithm.minibatch_size must not exceed train.batch_size")
        entry.check(algo, self.kl, self.train.batch_size)
        if algo.dynamic_sampling and (algo.num_generations < 2 or self.dyna.enabled):
            raise ValueError(
                "algorithm.dynamic_sampling needs prompt groups (num_generations >= 2) and true rewards for every row "
                "(dyna.enabled: false)"
            )
        if algo.overlong_buffer is not None and algo.overlong_buffer > self.generation.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong_buffer ({algo.overlong_buffer}) must not exceed generation.max_new_tokens "
                f"({self.generation.max_new_tokens})"
            )
        if self.data.prompts is not None and not self.data.prompts:
            raise ValueError("data.prompts is empty")
        if self.env.kind == "custom" and not self.env.factory:
            raise ValueError("env.kind custom needs env.factory ('my_env.py:make_env' or 'package.module:MyEnv')")
        if self.env.kind == "model" and not self.env.path:
            raise ValueError("env.kind model needs env.path (a folder written by `dynalm train-env-model`)")
        if not self.rewards and self.env.fluency_coef == 0 and self.env.kind not in ("custom", "model"):
            raise ValueError("no reward: give at least one entry in rewards or set env.fluency_coef")
        if self.dyna.enabled and not self.dyna.env_model and self.env.kind != "text":
            raise ValueError(
                "dyna learns the reward of single-turn tasks (env.kind: text); for a multi-turn environment set "
                "dyna.env_model (online, or a `dynalm train-env-model` folder)"
            )
        if self.dyna.enabled and self.dyna.env_model and self.env.kind == "text":
            raise ValueError("dyna.env_model learns a multi-turn environment: it needs env.kind dialog, custom or model")
        if self.env.kind != "dialog":
            dialog_only = sorted({t.name for t in self.rewards} & {"user_sentiment", "engagement", "goal_relevance"})
            if dialog_only:
                raise ValueError(f"reward '{dialog_only[0]}' scores a simulated user's reply: it needs env.kind: dialog")
        return self

    @property
    def use_value_head(self) -> bool:
        return self.algorithm.needs_value_head if self.model.value_head is None else self.model.value_head


# ----------------------------------------------------------------------------- loading


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_field_paths(ann, path + "."))
    return out


def _suggest(bad: str, schema: type[BaseModel] | None = None) -> str:
    schema = schema or Config
    candidates = _field_paths(schema)
    if schema is Config:
        candidates += [f"rewards.N.{k}" for k in RewardTerm.model_fields]
    close = difflib.get_close_matches(bad, candidates, n=1, cutoff=0.5)
    if not close:  # try matching only the last component within the same section
        section, _, leaf = bad.rpartition(".")
        leaves = [c for c in candidates if c.rpartition(".")[0] == section]
        close = difflib.get_close_matches(bad, leaves, n=1, cutoff=0.3)
    return f"did you mean '{close[0]}'?" if close else "see `dynalm config --show` for the valid keys"


def _format_validation_error(err: ValidationError, schema: type[BaseModel] | None = None) -> UserError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        generic = ".".join("N" if str(p).isdigit() else str(p) for p in e["loc"])
        return UserError(f"unknown config key '{loc}'", _suggest(generic, schema))
    if e["type"] == "missing":
        return UserError(f"config key '{loc}' is required", "add it to the config or pass --set")
    msg = e["msg"].removeprefix("Value error, ")
    if loc:
        got = e.get("input")
        got_s = f", got {got!r}" if not isinstance(got, (dict, list)) else ""
        return UserError(f"config key '{loc}': {msg}{got_s}", "fix the value in the config or with --set")
    return UserError(f"invalid config: {msg}", "fix the config")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Turn `['a.b=1', 'c=x']` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set '{item}' is not key=value", "write e.g. --set train.steps=10")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{item}' conflicts with another --set", "set each key once")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        elif k == "rewards" and isinstance(v, dict) and isinstance(out.get(k), list):
            # --set rewards.0.weight=2 addresses list items by index
            items = list(out[k])
            for idx, sub in v.items():
                i = int(idx) if str(idx).lstrip("-").isdigit() else -1
                if not 0 <= i < len(items):
                    raise UserError(f"--set rewards.{idx}: there are {len(items)} reward terms", "use an index in range")
                items[i] = deep_merge(items[i], sub) if isinstance(sub, dict) else sub
            out[k] = items
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found", "check the path, e.g. configs/story.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"config file '{path}' is not valid YAML: {first}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level", "write key: value pairs")
    return data


def build_config(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (or the defaults), apply `--set` style overrides, validate."""
    raw = read_yaml(path) if path else {}
    over = overrides if isinstance(overrides, dict) else parse_set(overrides)
    return build_config(deep_merge(raw, over))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
