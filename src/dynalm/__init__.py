"""dynalm: model-based reinforcement learning for language models.

A causal LM is the policy π(a|s) with a value head V(s) on its hidden states; language
models also serve as the environment model. Training: a2c (the seed article's
actor-critic), ppo, grpo, rloo.
"""

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import UserError  # noqa: E402


def train(config: "Config | str", out=None, **kwargs):
    """Train from a Config or a YAML path; returns the run directory."""
    from .run import train as _train

    cfg = load_config(config) if isinstance(config, str) else config
    return _train(cfg, out, **kwargs)


def load_run(run_dir, overrides=None):
    """(config, PolicyValueModel) of a finished or interrupted run."""
    from .trained import load_run as _load

    return _load(run_dir, overrides)


__all__ = ["Config", "load_config", "train", "load_run", "UserError", "__version__"]
