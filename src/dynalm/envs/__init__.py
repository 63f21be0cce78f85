"""Environments: one batched episode interface (base.py) that the rollout drives —
single-turn text (text.py), a dialog with a simulated user (dialog.py), and any
gymnasium-style text environment a user brings (custom.py), and a learned environment
model (model.py)."""

from .base import EpisodeEnv, Turn
from .custom import CustomEnv
from .dialog import DialogEnv
from .text import TextEnv

__all__ = ["CustomEnv", "DialogEnv", "EpisodeEnv", "TextEnv", "Turn", "make_env"]


def make_env(cfg, model, rewards=None):
    """The environment `cfg.env.kind` names."""
    if cfg.env.kind == "dialog":
        return DialogEnv(cfg, model, rewards)
    if cfg.env.kind == "custom":
        return CustomEnv(cfg, model.tokenizer, rewards)
    if cfg.env.kind == "model":
        from .model import ModelEnv

        return ModelEnv(cfg, model.tokenizer, rewards, device=model.device)
    return TextEnv(cfg, model.tokenizer, rewards)
