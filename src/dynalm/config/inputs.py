"""What a run starts from: the model, its data, how it samples and rolls out, the reward
terms, the KL leash and the environment."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import _Section


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
    turn_cache: bool = Field(
        True, description="Multi-turn rollouts keep each episode's KV cache from one assistant turn to the next and "
        "prefill only the new tokens (observation and template); false = prefill the whole conversation every turn. "
        "In env.user_generation: the dialog's user simulator keeps its own cache the same way, and prefills only "
        "what its re-rendered prompt does not share with what it read the turn before.",
    )


class RolloutConfig(_Section):
    recompute_logprobs: bool | None = Field(
        None,
        description="Take π_old (and V_old) from a no-grad training forward after the rollout instead of the KV-cache "
        "decode (TRL's way): under bf16 the two use different kernels, so PPO's first ratio is not 1; null = on on CUDA, off on CPU.",
    )
    is_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling: weight each token's loss by min(π_old/π_rollout, cap) when "
        "π_old is recomputed (recompute_logprobs) and the sampler's log-probs differ; null = off (2 with engine vllm)."
    )
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="What samples the training rollouts: hf = the policy itself (transformers, or dynalm's fast "
        "decoder); vllm = a colocated vLLM engine on the same CUDA device (pip install 'dynalm[vllm]'), the LoRA merged "
        "into its weights after every update, π_old recomputed by the training model and rollout.is_cap applied. "
        "Single-turn tasks, one process; eval and planners keep hf.",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Share of the GPU's memory vLLM may take for its weights and KV cache (engine vllm)."
    )
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="vLLM's weight and activation dtype (engine vllm); the update keeps model.dtype."
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
