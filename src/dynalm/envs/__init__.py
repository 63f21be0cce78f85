from .dialog import DialogEnv
from .text import TextEnv

__all__ = ["DialogEnv", "TextEnv", "make_env"]


def make_env(cfg, model, rewards=None):
    """The environment `cfg.env.kind` names: TextEnv (single turn) or DialogEnv (multi-turn)."""
    if cfg.env.kind == "dialog":
        return DialogEnv(cfg, model, rewards)
    return TextEnv(cfg, model.tokenizer, rewards)
