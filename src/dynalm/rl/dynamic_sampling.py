"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
Learning System at Scale", §3.2): a prompt group whose completions all scored alike has
zero group-relative advantage and gives no gradient, so it is dropped and replaced by
groups from new prompts, drawn in rounds until the batch holds no flat group or
`algorithm.dynamic_sampling_max_rounds` rounds are spent. A batch still short after that
is filled back with dropped groups, so every step trains on `train.batch_size` rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .advantages import flat_groups
from .batch import Batch


def _rows_of(batch: Batch, groups: list[int]) -> torch.Tensor:
    keep = torch.zeros(len(batch), dtype=torch.bool)
    for g in groups:
        keep |= (batch.group == g).cpu()
    return keep.nonzero().squeeze(-1).to(batch.group.device)


def refill_flat_groups(
    batch: Batch, draw: Callable[[int], Batch], n: int, max_rounds: int, pad_id: int = 0
) -> tuple[Batch, dict]:
    """`batch` with its flat groups replaced by informative ones from `draw(k)` (a scored
    batch of k new groups of n rows); returns (batch, metrics)."""
    groups = batch.group.unique().tolist()
    flat = flat_groups(batch.scores, batch.group)
    info = {"dynamic/flat_share": len(flat) / max(len(groups), 1), "dynamic/rounds": 0, "dynamic/extra_groups": 0}
    if not flat:
        info["dynamic/still_flat"] = 0
        return batch, info
    kept = [batch.rows(_rows_of(batch, [g for g in groups if g not in flat]))] if len(flat) < len(groups) else []
    need = len(flat)
    while need and info["dynamic/rounds"] < max_rounds:
        info["dynamic/rounds"] += 1
        new = draw(need)
        info["dynamic/extra_groups"] += need
        good = [g for g in new.group.unique().tolist() if g not in flat_groups(new.scores, new.group)][:need]
        if good:
            kept.append(new.rows(_rows_of(new, good)))
            need -= len(good)
    if need:  # still short: train on some flat groups (they add nothing, but keep the batch size)
        kept.append(batch.rows(_rows_of(batch, flat[:need])))
    info["dynamic/still_flat"] = need
    out = Batch.concat(kept, pad_id)
    out.group = torch.arange(len(out), device=out.group.device) // n  # whole groups, in order
    return out, info
