"""Settings of the decode-time planner; defined with the rest of the config."""

from ..config import PlannerConfig

__all__ = ["PlannerConfig"]
