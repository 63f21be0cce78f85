"""The work benchmarks/perf.py gives every side: the sides, the TRL versions and the pins of
their venvs, the model, data, batch and algorithm settings."""

SIDES = ["dynalm-grpo", "trl-grpo", "dynalm-ppo", "trl-ppo"]
TRL_VERSION = {"grpo": "1.16.0", "ppo": "1.12.0"}
TORCH_PIN = "torch==2.13.0"  # the CPU build on these machines; an unpinned torch pulls CUDA
# TRL venvs get the versions dynalm itself runs with (fallbacks: requirements-dev.txt's pins).
SHARED = {"transformers": "5.23.0", "tokenizers": "0.23.3", "peft": "0.21.2", "accelerate": "1.15.0",
          "datasets": "5.2.0", "safetensors": "0.8.0", "vaderSentiment": "3.3.2"}

MODEL = "smollm2-135m-instruct"
DATA = "builtin:story_train"
TEMPLATE = "Continue this story: {prompt}"
BATCH = 8
MAX_NEW_TOKENS = 48
LORA_R, LORA_ALPHA = 16, 32
GRPO = {"num_generations": 8, "beta": 0.04, "clip": 0.2}
PPO = {"kl_coef": 0.05, "clip": 0.2, "clip_value": 0.2, "vf_coef": 0.1, "lam": 0.95}
MAX_PROMPT_TOKENS = 256  # dynalm's default model.max_prompt_tokens; story openings are far shorter
