"""A learned environment model P(s', r, done | s, a) for text (the article's section 2.3 / 3.1):
trained on the transitions a run recorded (`env.record_transitions`), measured against the
same base model prompted as the simulator, and usable as an environment (`env.kind: model`,
envs/model.py)."""

from .network import EnvModel, EnvModelConfig
from .train import load_env_model, train_env_model

__all__ = ["EnvModel", "EnvModelConfig", "load_env_model", "train_env_model"]
