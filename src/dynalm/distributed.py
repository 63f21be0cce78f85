"""Data parallelism over processes: `accelerate launch -m dynalm train ...`.

Only used when the launcher starts more than one process (WORLD_SIZE > 1); a plain
`dynalm train` never imports it and runs exactly as before. Accelerate's `PartialState`
sets up the process group (gloo on CPU, NCCL on CUDA) and the device of each process;
everything else is plain `torch.distributed`.

What each process does (the global batch is `train.batch_size` completions per step):

- Prompts: every process draws the same prompts from the same PromptSampler and keeps
  its contiguous share (rank r takes the r-th of `world_size` equal slices). A prompt's
  `num_generations` completions stay on one process, so grpo/rloo group baselines are
  computed locally and are exactly the 1-process ones.
- Rollouts: each process samples its share with its own generator, seeded from
  (seed, rank); rank 0 uses `seed` itself.
- Statistics that span the batch use the whole batch: advantage whitening (sums
  all-reduced), the normalised reward terms' running statistics (values all-gathered in
  rank order), the adaptive KL controller and every logged metric (per-row values
  all-gathered; token means all-reduced, weighted by token counts).
- The update: see `sync_grads` and `trainer.update`. Every loss is a masked mean over the
  tokens of a minibatch. A process holding n_r of the minibatch's N tokens backpropagates
  its local mean scaled by n_r / N and the gradients are all-reduced as a *sum*, so the
  gradient is that of the global token mean: the 1-process gradient on the same rows.
  (Plain DDP averages per-process means, which differs whenever processes hold different
  numbers of tokens.) The minibatch permutation is drawn over the global batch with the
  same generator on every process, so minibatches have the same rows as in one process;
  a process takes the rows it holds (possibly none). Clipping and the optimizer step run
  after the sync on identical gradients, so the weights stay identical on all processes.

We all-reduce gradients by hand rather than wrapping the model in DDP: DDP's hooks fire
on `model.forward`, while a step also runs the policy through `generate`-style cached
forwards and the reference (adapter off), and its averaging is the inexact one above.

Checkpoints, metrics, samples, TensorBoard, export, eval and the report are written by
rank 0 alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError

# Elements per all-reduce bucket when syncing gradients (64 MiB of float32).
BUCKET_NUMEL = 16 * 2**20


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_seed(seed: int, rank: int) -> int:
    """The rollout generator's seed of `rank`: `seed` itself on rank 0 (so a 1-process run
    is unchanged), an independent stream derived from (seed, rank) elsewhere."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def check_world(cfg, world_size: int) -> None:
    """Refuse a global batch that cannot be split into equal shares of whole prompt groups."""
    if world_size <= 1:
        return
    if cfg.dyna.enabled:
        raise UserError(
            "dyna is not supported in data-parallel runs yet (each process would keep its own reward-model buffer)",
            "run Dyna in one process, or set dyna.enabled: false",
        )
    if cfg.env.record_transitions:
        raise UserError(
            "env.record_transitions is not supported in data-parallel runs yet (rank 0 would see only its own episodes)",
            "record transitions in a one-process run, or set env.record_transitions: false",
        )
    if cfg.algorithm.dynamic_sampling:
        raise UserError(
            "algorithm.dynamic_sampling is not supported in data-parallel runs yet (each process would refill its own share)",
            "run it in one process, or set algorithm.dynamic_sampling: false",
        )
    if cfg.algorithm.loss_agg != "token_mean":
        raise UserError(
            f"algorithm.loss_agg {cfg.algorithm.loss_agg} is not supported in data-parallel runs yet "
            "(the processes' losses are combined by their share of the tokens)",
            "run it in one process, or set algorithm.loss_agg: token_mean",
        )
    n = cfg.algorithm.num_generations
    prompts = cfg.train.batch_size // n
    if prompts % world_size:
        per = f" ({n} completions each)" if n > 1 else ""
        fix = f"e.g. train.batch_size={world_size * n * max(1, -(-prompts // world_size))}"
        raise UserError(
            f"{prompts} prompts per step{per} cannot be split evenly over {world_size} processes",
            f"make train.batch_size / algorithm.num_generations a multiple of {world_size}, {fix}",
        )


def check_launch() -> None:
    """Refuse Accelerate launch modes that dynalm does not implement (it shards data, not the model)."""
    for var, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() == "true":
            raise UserError(
                f"accelerate launched with {what}, which dynalm does not implement yet (it replicates the model on each process)",
                "launch with configs/accelerate/multi_gpu.yaml; see docs/distributed.md",
            )


@dataclass
class Dist:
    """This process's place in a data-parallel run, and the few collectives dynalm uses."""

    rank: int
    world_size: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, *, cpu: bool) -> "Dist | None":
        """None for a single process; else set up the process group via Accelerate."""
        if world_size_from_env() <= 1:
            return None
        check_launch()
        try:
            from accelerate import PartialState
        except ImportError:  # pragma: no cover - a declared dependency
            raise UserError("accelerate is not installed", "pip install accelerate") from None
        state = PartialState(cpu=cpu)
        if state.num_processes <= 1:  # pragma: no cover - a launcher that set WORLD_SIZE but no process group
            return None
        local = int(os.environ.get("LOCAL_WORLD_SIZE", state.num_processes))
        return cls(state.process_index, state.num_processes, local, state.device)

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over processes, in place; returns `t`."""
        torch.distributed.all_reduce(t)
        return t

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Elementwise sum over processes of a small float vector (float64 on this process's device)."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device).reshape(-1).clone()
        return self.all_reduce(t)

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_floats(self, values: list[float]) -> list[float]:
        """The concatenation, in rank order, of every process's list: the global batch's order."""
        return [v for part in self.gather(list(values)) for v in part]

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def any(self, flag: bool) -> bool:
        return bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def barrier(self) -> None:
        torch.distributed.barrier()

    def close(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ parameters
    def broadcast_params(self, params: list[torch.Tensor]) -> None:
        """Make every process start from rank 0's values (they are seeded alike; this makes sure)."""
        with torch.no_grad():
            for chunk in _buckets(params):
                flat = torch.cat([p.detach().reshape(-1) for p in chunk])
                torch.distributed.broadcast(flat, src=0)
                _unflatten_into(flat, chunk, lambda p, v: p.copy_(v))

    def sync_grads(self, params: list[torch.Tensor]) -> None:
        """All-reduce (sum) the gradients of `params`.

        The caller scaled each process's loss by its share of the minibatch's tokens, so the
        sum is the gradient of the global token mean. A parameter no process computed a
        gradient for keeps `grad = None` (Adam then leaves it alone, as in one process); one
        that only some processes reached gets zeros from the others.
        """
        with torch.no_grad():
            has = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
            self.all_reduce(has)
            live = [p for p, h in zip(params, has.tolist()) if h > 0]
            for p in live:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            for chunk in _buckets(live):
                flat = torch.cat([p.grad.reshape(-1) for p in chunk])
                self.all_reduce(flat)
                _unflatten_into(flat, chunk, lambda p, v: p.grad.copy_(v))


def _buckets(params: list[torch.Tensor]):
    chunk, n = [], 0
    for p in params:
        chunk.append(p)
        n += p.numel()
        if n >= BUCKET_NUMEL:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _unflatten_into(flat: torch.Tensor, params: list[torch.Tensor], put) -> None:
    i = 0
    for p in params:
        k = p.numel()
        put(p, flat[i : i + k].view_as(p))
        i += k


# ----------------------------------------------------------------------------- global statistics


def global_masked_mean(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    s = dist.sum(torch.stack([(x * mask).sum(), mask.sum()]).detach().double())
    return (s[0] / s[1].clamp(min=1)).to(x.dtype)


def global_masked_var(x: torch.Tensor, mask: torch.Tensor, dist: Dist) -> torch.Tensor:
    """advantages.masked_var over every process's tokens (unbiased)."""
    mean = global_masked_mean(x, mask, dist)
    s = dist.sum(torch.stack([(((x - mean) ** 2) * mask).sum(), mask.sum()]).detach().double())
    n = s[1]
    var = s[0] / n.clamp(min=1)
    return (var * n / (n - 1) if n > 1 else var).to(x.dtype)


def global_explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, dist: Dist) -> float:
    var_y = global_masked_var(returns, mask, dist)
    var_r = global_masked_var(returns - values, mask, dist)  # a collective: every process calls it
    if var_y <= 0:
        return float("nan")
    return float(1 - var_r / var_y)
