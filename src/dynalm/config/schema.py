"""The whole run's config: its sections and the checks that span more than one of them."""

from __future__ import annotations

from pydantic import Field, model_validator

from ..rl.algorithms import ALGORITHMS
from .base import _Section
from .inputs import DataConfig, EnvConfig, GenerationConfig, KLConfig, ModelConfig, RewardTerm, RolloutConfig
from .training import AlgorithmConfig, DynaConfig, EvalConfig, LogConfig, PlannerConfig, TrainConfig


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
        if self.rollout.engine == "vllm":
            if self.env.kind != "text":
                raise ValueError("rollout.engine vllm samples single-turn tasks (env.kind: text); multi-turn environments "
                                 "roll out with rollout.engine: hf")
            if self.rollout.recompute_logprobs is False:
                raise ValueError("rollout.engine vllm needs π_old from the training model: set rollout.recompute_logprobs "
                                 "to null or true")
            if self.generation.top_p < 1 or self.generation.top_k > 0:
                raise ValueError("rollout.engine vllm reports log-probs after top-p/top-k truncation, dynalm's sampler "
                                 "before it: set generation.top_p: 1 and generation.top_k: 0")
            if self.rollout.is_cap is None:  # vLLM's kernels are not the training model's: correct for it by default
                self.rollout.is_cap = 2.0
            if self.generation.temperature < 0.01:
                raise ValueError("rollout.engine vllm samples greedily near temperature 0, without the log-probs the "
                                 "update needs: set generation.temperature to 0.01 or more")
        if self.env.kind != "dialog":
            dialog_only = sorted({t.name for t in self.rewards} & {"user_sentiment", "engagement", "goal_relevance"})
            if dialog_only:
                raise ValueError(f"reward '{dialog_only[0]}' scores a simulated user's reply: it needs env.kind: dialog")
        return self

    @property
    def use_value_head(self) -> bool:
        return self.algorithm.needs_value_head if self.model.value_head is None else self.model.value_head
