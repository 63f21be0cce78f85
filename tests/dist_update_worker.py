"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes.

For each case, every process builds the same model and the same global batch of rollouts
(a 1-process rollout: deterministic on CPU, so identical on both), then

- `single`: a 1-process Trainer learns from the whole batch (no communication);
- `dist`:   a data-parallel Trainer learns from this process's half, with its padding
            trimmed so the halves have different shapes and token counts;

and reports how far the two updates are apart, plus the gradient of the first minibatch
three ways (1-process, token-weighted sum as dynalm does, plain DDP mean of per-process
means) to show the weighting matters. Rank 0 writes everything to argv[2] as JSON.
"""

from __future__ import annotations

import copy
import json
import sys

import torch

from dynalm.config import build_config
from dynalm.distributed import Dist
from dynalm.models.policy import PolicyValueModel
from dynalm.rl.objectives import loss_fn
from dynalm.rl.trainer import Trainer, seed_everything

MODEL, OUT = sys.argv[1], sys.argv[2]
PROMPTS = ["once the cat", "a dog sat on the mat and then", "the king", "big red tree", "small bird ran", "sun"]

CASES = {
    # GAE + whitening + clipped value loss; minibatches of 4 over a global batch of 6, 2 epochs
    "ppo": {"algorithm": {"name": "ppo", "minibatch_size": 4, "epochs": 2}, "train": {"batch_size": 6}},
    # group advantages + k3 KL in the loss; minibatches of one row, so one process holds none
    "grpo": {"algorithm": {"name": "grpo", "num_generations": 2, "minibatch_size": 1}, "kl": {"coef": 0.1},
             "train": {"batch_size": 8}},
    # the article's TD(0) actor-critic, one update on the whole batch
    "a2c": {"algorithm": {"name": "a2c"}, "train": {"batch_size": 4}},
}


def config(extra: dict):
    from dynalm.config import deep_merge

    raw = {
        "seed": 3,
        "model": {"name": MODEL, "lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"prompts": PROMPTS},
        "generation": {"max_new_tokens": 8, "stop_at_eos": True},
        "rewards": [{"name": "distinct1"}, {"name": "length", "weight": 0.1}],
        "train": {"learning_rate": 1e-2, "threads": 1},
        "log": {"progress": False, "tensorboard": False},
        "eval": {"enabled": False},
    }
    return build_config(deep_merge(raw, extra))


def shard(batch, rank: int, world: int):
    """Rows rank·b … of the global batch, its all-padding columns (left and right) dropped."""
    b = len(batch) // world
    part = copy.deepcopy(batch.rows(torch.arange(rank * b, (rank + 1) * b)))
    T = part.action_mask.shape[1]
    keep_t = int(part.action_mask.sum(0).nonzero().max()) + 1
    P = part.input_ids.shape[1] - T
    first = int(part.attention_mask[:, :P].sum(0).nonzero().min())
    for name in ("input_ids", "attention_mask"):
        setattr(part, name, getattr(part, name)[:, first : P + keep_t])
    for name in ("action_mask", "logprobs", "values", "turn_ids", "turn_scores", "ref_logprobs", "rewards", "advantages", "returns"):
        v = getattr(part, name)
        if v is not None:
            setattr(part, name, v[:, :keep_t])
    return part


def trainable(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def first_grads(model, batch, cfg, scale: float) -> torch.Tensor:
    """Gradient of the (scaled) loss on `batch` with advantages from a 1-process `learn` prefix."""
    model.zero_grad(set_to_none=True)
    loss, _ = loss_fn(cfg, 0.0)(model, batch, batch.action_mask.shape[1])
    (loss * scale).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def main() -> None:
    dist = Dist.from_env(cpu=True)
    assert dist is not None and dist.world_size == 2, "launch with 2 processes"
    report = {}
    for name, extra in CASES.items():
        cfg = config(extra)
        seed_everything(cfg.seed)
        base = PolicyValueModel.from_config(cfg)
        rows = [{"prompt": p} for p in PROMPTS]
        # the global batch: one process's rollout (its fields from the rollout are what learn() reads)
        batch = Trainer(cfg, copy.deepcopy(base), rows).step().batch
        before = trainable(base)

        single = Trainer(cfg, copy.deepcopy(base), rows)
        m1 = single.learn(copy.deepcopy(batch)).metrics
        mine = shard(batch, dist.rank, dist.world_size)
        n_local = float(mine.action_mask.sum())
        par = Trainer(cfg, copy.deepcopy(base), rows, dist=dist)
        m2 = par.learn(copy.deepcopy(mine)).metrics
        d1, d2 = trainable(single.model) - before, trainable(par.model) - before

        # Gradient of the whole-batch loss (advantages as the 1-process learn computed them).
        whole = copy.deepcopy(batch)
        probe = Trainer(cfg, copy.deepcopy(base), rows)
        probe.learn(whole)  # fills ref_logprobs, rewards, advantages, returns
        g1 = first_grads(copy.deepcopy(base), whole, cfg, 1.0)
        part = shard(whole, dist.rank, dist.world_size)
        n_global = float(dist.sum([n_local])[0])
        g_exact = dist.all_reduce(first_grads(copy.deepcopy(base), part, cfg, n_local / n_global))
        g_ddp = dist.all_reduce(first_grads(copy.deepcopy(base), part, cfg, 1.0 / dist.world_size))

        keys = [k for k in m1 if not k.startswith("time/") and k != "tokens_per_s"]
        report[name] = {
            "rank": dist.rank,
            "tokens": n_local,
            "shape": list(mine.input_ids.shape),
            "update_norm": float(d1.norm()),
            "update_diff": float((d1 - d2).abs().max()),
            "metrics_single": {k: m1[k] for k in keys},
            "metrics_dist": {k: m2.get(k) for k in keys},
            "grad_norm": float(g1.norm()),
            "grad_diff_exact": float((g1 - g_exact).abs().max()),
            "grad_diff_ddp_mean": float((g1 - g_ddp).abs().max()),
            "params": trainable(par.model).tolist(),
        }
    everyone = dist.gather(report)
    if dist.is_main:
        with open(OUT, "w") as fh:
            json.dump(everyone, fh)
    dist.close()


if __name__ == "__main__":
    main()
