"""Decode-time planning: sampling, greedy, best-of-n reranking, and value-guided token MCTS."""

from .config import PlannerConfig
from .mcts import PathReward, TokenMCTS, path_reward_for
from .planner import PlanResult, best_of_n_select, plan
from .tree import Node, StepStats

__all__ = ["PlannerConfig", "PlanResult", "plan", "best_of_n_select", "TokenMCTS", "Node", "StepStats", "PathReward", "path_reward_for"]
