from .text import TextEnv

__all__ = ["TextEnv"]
