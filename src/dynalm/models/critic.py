"""The critic V(s): where its features come from, and the scale its head predicts on.

Three places for the trunk that feeds the linear value head (`model.critic`):

* `head` — the policy's own last hidden layer (the article's form, section 3.3): no
  extra forward pass, but the critic can only read what the policy computes;
* `adapter` — a second LoRA adapter (named `critic`) on the policy's frozen base: one copy
  of the base weights in memory, its own features, and a forward pass of its own;
* `model` — a separate causal LM (any `--model` form, or a `dynalm train-rm` reward model
  via `model.critic_init`, as PPO-MCTS and OpenRLHF start their critics), LoRA-tuned when
  `model.lora.enabled`.

PopArt value normalisation (van Hasselt et al. 2016; `algorithm.value_norm`): the head
predicts (V − μ)/σ, with μ and σ running statistics of the value targets; every time they
move, the head's weights are rescaled so that V itself does not, and the value loss is
measured on the normalised scale so its size does not follow the reward's.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .loading import disable_dropout, load_causal_lm, lora_targets

CRITIC_ADAPTER = "critic"  # the name of the critic's LoRA adapter beside peft's "default"


def tuner_layers(lm: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]


def add_critic_adapter(lm: nn.Module, lora_cfg) -> None:
    """Add the `critic` LoRA adapter to a peft model (inactive: the policy's stays active),
    its parameters trainable."""
    import copy as _copy

    lcfg = _copy.deepcopy(lm.peft_config["default"])
    lcfg.r, lcfg.lora_alpha = lora_cfg.r, lora_cfg.alpha
    lm.add_adapter(CRITIC_ADAPTER, lcfg)
    for n, p in lm.named_parameters():
        if f".{CRITIC_ADAPTER}." in n:
            p.requires_grad_(True)


@contextlib.contextmanager
def adapter_active(lm: nn.Module, name: str, params: list[nn.Parameter]):
    """Run `lm` with adapter `name` instead of the policy's, without peft's `set_adapter`
    (which flips requires_grad on every adapter). `params` (the adapter's weights) are made
    trainable for the pass: peft's `disable_adapter` (the reference pass) clears them."""
    layers = tuner_layers(lm)
    before = [m._active_adapter for m in layers]
    for p in params:
        p.requires_grad_(True)
    try:
        for m in layers:
            m._active_adapter = [name]
        yield lm
    finally:
        for m, a in zip(layers, before):
            m._active_adapter = a


def build_critic_lm(mcfg) -> tuple[nn.Module, nn.Linear | None, object]:
    """The trunk of `model.critic: model`: a train-rm reward model (its LoRA and its head)
    when `critic_init` is set, else `critic_model` (null = the policy's model), with a LoRA
    adapter when `model.lora.enabled`. Returns (lm, head or None, tokenizer)."""
    if mcfg.critic_init:
        return _reward_model_trunk(mcfg.critic_init)
    lm, tok = load_causal_lm(mcfg.critic_model or mcfg.name, dtype=torch.float32)
    return _trunk(lm, mcfg.lora.enabled, mcfg.lora.r, mcfg.lora.alpha, mcfg.lora.target_modules), None, tok


def _trunk(lm: nn.Module, lora: bool, r: int, alpha: float, targets) -> nn.Module:
    lm.config.use_cache = False
    disable_dropout(lm)
    if not lora:
        return lm
    from peft import LoraConfig, get_peft_model

    return get_peft_model(lm, LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
        target_modules=lora_targets(lm.config.model_type, targets),
    ))


def _reward_model_trunk(folder: str) -> tuple[nn.Module, nn.Linear, object]:
    """A `dynalm train-rm` folder read as a critic: its trunk (with the adapter it trained)
    and its head, so V(finished text) starts at the reward model's score (the folder read
    by models/rm_folder.py, as rewards/learned.py reads it)."""
    from ..errors import UserError
    from .rm_folder import FIX, read_meta, read_weights

    d, meta = read_meta(folder)
    rm, state = meta["config"], read_weights(d)
    lm, tok = load_causal_lm(rm["model"], dtype=torch.float32)
    lm = _trunk(lm, rm["lora"], rm["lora_r"], rm["lora_alpha"], None)
    head = nn.Linear(lm.config.get_text_config().hidden_size, 1)
    head.load_state_dict({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")})
    trunk = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
    missing = sorted({n for n, p in lm.named_parameters() if p.requires_grad} - set(trunk))
    if missing:
        raise UserError(f"reward model '{d}' does not fit its own trunk (lacks {missing[0]})", FIX)
    lm.load_state_dict(trunk, strict=False)
    return lm, head, tok


def same_vocabulary(a, b) -> bool:
    """The critic reads the policy's token ids: both tokenizers must map text to the same ids."""
    return a.get_vocab() == b.get_vocab()


class ValueNorm(nn.Module):
    """PopArt: running mean μ and variance σ² of the value targets (an exponential average
    over steps), V = σ·v̂ + μ, and the head's rescaling that keeps V fixed when μ, σ move."""

    def __init__(self, decay: float = 0.9, eps: float = 1e-4):
        super().__init__()
        self.decay, self.eps = decay, eps
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("var", torch.ones(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def std(self) -> torch.Tensor:
        return self.var.clamp(min=self.eps).sqrt()

    def forward(self, normalised: torch.Tensor) -> torch.Tensor:
        return normalised * self.std + self.mean

    @torch.no_grad()
    def update(self, batch_mean: float, batch_var: float, head: nn.Linear) -> None:
        """Move μ, σ² towards one batch's target mean and variance (the first batch sets them)
        and rescale `head` so that every V(s) is unchanged (PopArt's 'preserving outputs')."""
        old_mu, old_sigma = self.mean.clone(), self.std.clone()
        if int(self.steps) == 0:
            mu, var = torch.tensor(float(batch_mean)), torch.tensor(float(batch_var))
        else:
            d = self.decay
            mu = d * self.mean + (1 - d) * batch_mean
            # the second moment is averaged, so the variance includes the mean's motion
            second = d * (self.var + self.mean**2) + (1 - d) * (batch_var + batch_mean**2)
            var = second - mu**2
        self.mean.copy_(mu)
        self.var.copy_(torch.as_tensor(var).clamp(min=0.0))
        self.steps += 1
        sigma = self.std
        head.weight.mul_(old_sigma / sigma)
        head.bias.copy_((old_sigma * head.bias + old_mu - self.mean) / sigma)


class PrefixCritic:
    """V(prefix + path) for many short paths below one prefix that only grows (a search's
    committed text), read by a critic with a trunk of its own (`model.critic: adapter |
    model`): its pass over the prefix is kept as a KV cache, so a path costs a forward of the
    path's tokens alone rather than of the whole text. One unpadded sequence; positions run on
    from the prefix; the same numbers as `state_values` up to float rounding."""

    def __init__(self, model):
        self.model = model
        self.ids: list[int] = []
        self.cache = None
        self.last = None  # the last hidden state of the prefix

    @torch.no_grad()
    def _forward(self, tokens: list[int]) -> torch.Tensor:
        m, start = self.model, len(self.ids)
        ids = torch.tensor([tokens], dtype=torch.long, device=m.device)
        pos = torch.arange(start, start + len(tokens), device=m.device)[None]
        with m.critic_trunk() as lm, m.autocast():
            out = lm(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True, output_hidden_states=True,
                     logits_to_keep=1)
        self.cache = out.past_key_values
        return out.hidden_states[-1][0, -1].float()

    @torch.no_grad()
    def value(self, prefix: list[int], path: list[int]) -> float:
        """V of the text `prefix + path` (token ids, the prompt's included)."""
        if self.cache is None or prefix[: len(self.ids)] != self.ids:  # not an extension of the cached prefix
            self.ids, self.cache, self.last = [], None, None
        if len(prefix) > len(self.ids):
            self.last = self._forward(prefix[len(self.ids):])
            self.ids = list(prefix)
        if not path:
            return float(self.model._value(self.last[None]).reshape(()))
        h = self._forward(path)
        self.cache.crop(-len(path))  # back to the prefix for the next path
        return float(self.model._value(h[None]).reshape(()))
