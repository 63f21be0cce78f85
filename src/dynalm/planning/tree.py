"""The search tree of token MCTS (mcts.py): a node is a prefix, an edge a token."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import kv as kvx


@dataclass(eq=False, slots=True)
class Node:
    token: int | None  # the edge into this node (None at the prompt)
    parent: "Node | None"
    prior: float
    depth: int  # completion tokens in the prefix
    path_reward: float = 0.0  # Σ of the per-token rewards (PathReward) from the prompt to here
    terminal: bool = False  # EOS or the token limit: scored by the reward, never expanded
    ended: bool = False  # terminal at EOS (rather than at the limit)
    visits: int = 0
    value_sum: float = 0.0
    value: float | None = None  # this node's own leaf evaluation, computed once
    children: list["Node"] = field(default_factory=list)  # in descending prior order
    kv: kvx.KV | None = None  # K/V of `token` (policy)
    ref_kv: kvx.KV | None = None  # K/V of `token` (reference), only with per-token rewards
    virtual: list[float] = field(default_factory=list)  # virtual losses charged in the current wave
    chain: "list[Node] | None" = None  # a wave's rollout below this leaf, until it is backed up

    def q(self, default: float) -> float:
        return self.value_sum / self.visits if self.visits else default


@dataclass
class StepStats:
    token: int  # the token emitted after this search
    visits: dict[int, int]  # root's children: token → visit count
    carried: int  # visits the root's children already had from the reused subtree
