"""The update: the algorithm's gradient steps on one scored batch (minibatches × epochs,
clipping, the optimizer step), and the optimizer, schedule and prompt order it runs with."""

from __future__ import annotations

import math

import torch

from ..config import AlgorithmConfig, RolloutConfig, TrainConfig
from ..distributed import Dist
from ..errors import UserError
from ..models.policy import PolicyValueModel
from .batch import Batch


class NonFiniteError(UserError):
    """A NaN or inf appeared in a loss, a gradient or a reward.

    `what` names the quantity and the step; the run driver adds the last good checkpoint
    and how to resume. Raised from `update` or the reward check, the batch can be skipped
    (`train.skip_nonfinite`): no optimizer step was taken with it.
    """

    def __init__(self, what: str, fix: str = "lower train.learning_rate, or allow skips with train.skip_nonfinite"):
        super().__init__(what, fix)


def _nonfinite(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def recompute_logprobs(model: PolicyValueModel, batch: Batch, temperature: float) -> None:
    """π_old and V_old from a no-grad forward of the training model (TRL's way) in place of
    the KV-cache decode's: on CUDA under bf16 the two run different kernels, and PPO's first
    ratio must be exactly 1."""
    was = model.training
    model.train()  # the same mode as the update's forward (dropout is off in any case)
    with torch.no_grad():
        out = model(batch.input_ids, batch.attention_mask, n_actions=batch.n_actions, temperature=temperature, entropy=False)
    model.train(was)
    mask = batch.action_mask
    batch.rollout_logprobs = batch.logprobs
    batch.logprobs = out.logprobs * mask
    if out.values is not None:  # a rollout engine other than the policy reads no values
        batch.values = out.values * mask


def wants_recompute(rollout: RolloutConfig, model: PolicyValueModel) -> bool:
    """π_old from the training model: asked for, or by default on CUDA and whenever another
    engine (vLLM) sampled the rollouts."""
    r = rollout.recompute_logprobs
    return r if r is not None else (model.device.type == "cuda" or rollout.engine != "hf")


class PromptSampler:
    """Deterministic, resumable order over the training rows: shuffled each pass when asked."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._order = self._make_order()


def build_optimizer(model: PolicyValueModel, t: TrainConfig) -> torch.optim.Optimizer:
    groups = [{"params": model.policy_parameters(), "lr": t.learning_rate}]
    if model.value_head is not None:
        groups.append({"params": model.value_parameters(), "lr": t.value_learning_rate or t.learning_rate})
    # fused=False: fused kernels do not bump the parameters' version counters, which the fast decoder's
    # cache and the vLLM engine's weight sync read to see that the policy moved
    if t.weight_decay:
        return torch.optim.AdamW(groups, betas=tuple(t.adam_betas), weight_decay=t.weight_decay, fused=False)
    return torch.optim.Adam(groups, betas=tuple(t.adam_betas), fused=False)


def build_scheduler(opt, t: TrainConfig):
    w = t.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / w) if w else 1.0)


# The loss parts reduced over processes (with the loss itself, last).
_PARTS = ("policy_loss", "value_loss", "value_clipfrac", "entropy", "approx_kl", "clipfrac", "kl_loss")
# What `update` reports, averaged over its optimizer steps.
_LOGGED = (*_PARTS[:6], "grad_norm", "kl_loss")


def _minibatches(B: int, mbs: int, epochs: int, gen: torch.Generator):
    """Row indices of each minibatch, epoch after epoch: a fresh permutation of the B rows per
    epoch drawn from `gen` (none when one epoch is one minibatch). Stop iterating to stop early."""
    for _epoch in range(epochs):
        perm = torch.randperm(B, generator=gen) if epochs > 1 or mbs < B else torch.arange(B)
        for start in range(0, B, mbs):
            yield perm[start : start + mbs]


def _averaged(sums: dict[str, float], count: int) -> dict:
    out = {k: v / count for k, v in sums.items()}
    out["update_passes"] = count
    return out


def update(
    model: PolicyValueModel, opt, batch: Batch, algorithm: AlgorithmConfig, loss_fn, gen: torch.Generator,
    step: int, dist: Dist | None = None,
) -> dict:
    """The algorithm's gradient steps on one batch; returns averaged diagnostics.
    `loss_fn(model, minibatch, T)` returns (loss, parts): objectives.minibatch_loss, or
    objectives.critic_loss during the value warm-up, bound to their config sections;
    `algorithm` gives the minibatch size, epochs, gradient clip and target KL.

    One loop for one process and for several: a single process is a world of one (`_One`),
    where every collective is the identity, so the two cannot drift apart. With `dist`,
    `batch` is this process's equal share (rows rank·b … rank·b + b − 1 of the global batch)
    and the steps are those of one process on the global batch: the same minibatches
    (permutation drawn over the global rows), each process's loss scaled by its share of
    the minibatch's tokens, gradients summed over processes before clipping.
    """
    world = dist if dist is not None else _One()
    a = algorithm
    b, T = batch.action_mask.shape
    offset, B = world.rank * b, b * world.world_size
    mbs = a.minibatch_size or B
    dev = batch.action_mask.device
    params = [p for g in opt.param_groups for p in g["params"]]
    model.train()
    sums: dict[str, float] = {}
    count = 0
    for ids in _minibatches(B, mbs, a.epochs, gen):
        ids = ids[(ids >= offset) & (ids < offset + b)] - offset  # the rows of this minibatch held here
        opt.zero_grad(set_to_none=True)
        if len(ids):
            mb = batch.rows(ids.to(dev))
            loss, parts = loss_fn(model, mb, T)
            n_local = mb.action_mask.sum()
        else:  # none of this minibatch's rows are here: contribute nothing, still join the collectives
            loss, parts, n_local = torch.zeros((), device=dev), {k: torch.zeros(()) for k in _PARTS}, torch.zeros(())
        # Σ over processes of (local mean × local tokens) / global tokens = the global token mean.
        # (float64: in a world of one, (x·n)/n gives back the float32 x exactly.)
        n64 = n_local.detach().to(dev, torch.float64).reshape(1)
        means = torch.stack([parts[k].detach().to(dev, torch.float64) for k in _PARTS] + [loss.detach().to(dev, torch.float64)])
        tot = world.sum(torch.cat([n64, means * n64]))  # one all-reduce for the token count and every part
        n_global = max(float(tot[0]), 1.0)
        glob = {k: float(v) / n_global for k, v in zip(_PARTS + ("loss",), tot[1:].tolist())}
        if not math.isfinite(glob["loss"]):
            bad = ", ".join(f"{k}={glob[k]}" for k in ("policy_loss", "value_loss", "entropy", "kl_loss") if not math.isfinite(glob[k]))
            raise NonFiniteError(f"non-finite loss at step {step} ({bad or 'sum of the terms'})")
        if len(ids):
            (loss if world.world_size == 1 else loss * (float(n_local) / n_global)).backward()
        world.sync_grads(params)
        gnorm = _clip_and_step(model, opt, a.max_grad_norm, step)
        glob["grad_norm"] = float(gnorm)
        for k in _LOGGED:
            sums[k] = sums.get(k, 0.0) + glob[k]
        count += 1
        if a.target_kl is not None and glob["approx_kl"] > a.target_kl:
            break
    return _averaged(sums, count)


class _One:
    """The world of one process: every collective is the identity."""

    rank, world_size = 0, 1

    @staticmethod
    def sum(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float64).reshape(-1)

    @staticmethod
    def sync_grads(params) -> None:
        pass


def _clip_and_step(model: PolicyValueModel, opt, max_grad_norm: float | None, step: int) -> torch.Tensor:
    """Clip the gradients, check them, take the optimizer step; returns the policy's grad norm.

    A shared critic is clipped with the policy (one loss, one trunk); a detached side
    critic, or one with a trunk of its own, on its own, so the policy's step does not
    depend on the critic's gradient.
    """
    apart = model.value_detached or getattr(model, "critic_kind", "head") != "head"  # no shared trunk
    groups = [model.policy_parameters(), model.value_parameters()] if apart else [
        [p for g in opt.param_groups for p in g["params"]]
    ]
    norms = []
    for params in groups:
        if max_grad_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        else:
            norms.append(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None)))
    gnorm = norms[0]
    if any(_nonfinite(n) for n in norms):
        # checked before opt.step: the weights never see a non-finite gradient
        raise NonFiniteError(f"non-finite gradient at step {step} (grad_norm={float(gnorm)})")
    opt.step()
    return gnorm
