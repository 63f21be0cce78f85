"""A learned reward model: an LM trunk with a scalar head, trained on rated or paired completions.

r(prompt, completion) is a linear head on the trunk's last hidden state at the last real
token of `[rendered prompt + completion]` (Stiennon et al. 2020; Ouyang et al. 2022).
Training data is JSONL with one kind of row per file:

* `{"prompt", "completion", "reward"}` — regression on the given rewards (MSE);
* `{"prompt", "chosen", "rejected"}` — preference pairs, Bradley–Terry loss.

`rm_training.train_reward_model` writes `reward_model.safetensors` (the trainable weights: LoRA + head,
or the full model + head) and `reward_model.json` (config and metrics); `load_reward_model`
reads them back, and `learned_reward(path)` / `resolve_learned("rm:PATH")` turn a saved
model into a reward function of TRL's shape. `RewardModel.fit` refits a loaded model
online on fresh (prompt, completion, reward) triples, for Dyna-style model learning.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..checkpoint import publish_folder
from ..errors import UserError
from ..models import rm_folder
from ..models.rm_folder import META_FILE, WEIGHTS_FILE
FORMAT_VERSION = 1

PAIR_FIELDS = ("prompt", "chosen", "rejected")
REGRESSION_FIELDS = ("prompt", "completion", "reward")


# ---------------------------------------------------------------------------- config
class RewardModelConfig(BaseModel):
    """Settings of `dynalm train-rm`: the trunk, the data and the optimisation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(
        "smollm2-135m-instruct",
        description="Trunk LM: hub id, local directory, local .gguf file, or the embedded default 'smollm2-135m-instruct'.",
    )
    lora: bool = Field(True, description="Train a LoRA adapter on the trunk (plus the head) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    data: str = Field(..., description="JSONL of {prompt, completion, reward} rows or {prompt, chosen, rejected} pairs.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of rows held out for evaluation (seeded split).")
    epochs: int = Field(2, ge=1, description="Passes over the training rows.")
    batch_size: int = Field(8, ge=1, description="Rows (or pairs) per gradient step.")
    learning_rate: float = Field(1e-4, gt=0, description="Adam learning rate.")
    max_tokens: int = Field(256, ge=2, description="Longest prompt + completion in tokens; longer ones lose their start.")
    prefixes: int = Field(
        0, ge=0, description="Rated completions: also train on this many prefixes of each (cut after a random number of "
        "its tokens; 0 tokens = the prompt alone), each with the whole completion's reward as its target: the "
        "Monte-Carlo value of that state, so the model can start a critic (`model.critic_init`) that scores unfinished text."
    )
    seed: int = Field(0, description="Seed for the split, the shuffling and the head's initialisation.")
    template: str = Field(
        "{prompt}", description="How the prompt is shown ({prompt}); wrapped in the chat template when the tokenizer has one."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run; auto = cuda if available.")

    @field_validator("template")
    @classmethod
    def _template_uses_prompt_only(cls, v: str) -> str:
        try:
            v.format(prompt="")
        except KeyError as exc:
            raise ValueError(f"the template may only use {{prompt}}, not {{{exc.args[0]}}}") from None
        except IndexError:
            raise ValueError("the template may only use {prompt}, not positional {}") from None
        except ValueError as exc:
            raise ValueError(f"the template is not a valid format string: {exc}") from None
        return v


# ---------------------------------------------------------------------------- losses and metrics
def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted and given rewards, mean over the batch.

    Fitting a reward model to scalar ratings by least squares, as in the reward-model
    learning of model-based RL (Sutton 1990, Dyna; Sutton & Barto 2018, §8.2).
    """
    return F.mse_loss(pred.float(), target.float())


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected), mean over pairs: the Bradley–Terry preference likelihood.

    P(chosen ≻ rejected) = σ(r_c − r_r) (Bradley & Terry 1952), the reward-model loss of
    Christiano et al. 2017 ("Deep RL from Human Preferences") and Ouyang et al. 2022
    ("Training language models to follow instructions with human feedback", eq. 1).
    `logsigmoid` keeps it finite for large margins.
    """
    return -F.logsigmoid(r_chosen.float() - r_rejected.float()).mean()


# ---------------------------------------------------------------------------- the model
def _pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def last_real_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last position with mask 1 (works for left or right padding)."""
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(-1).values.clamp(min=0)


class RewardModel(nn.Module):
    """r(prompt, completion): a causal-LM trunk (LoRA by default) and a Linear(hidden, 1) head."""

    def __init__(self, lm: nn.Module, tokenizer, cfg: RewardModelConfig):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.cfg = cfg
        hidden = lm.config.get_text_config().hidden_size
        self.head = nn.Linear(hidden, 1)
        # A small head starts every score near the bias, so the trunk's random features do
        # not add noise of the targets' size before training has found the signal.
        nn.init.normal_(self.head.weight, std=0.1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self._fit_opt: torch.optim.Optimizer | None = None
        self._fit_gen = random.Random(cfg.seed)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, cfg: RewardModelConfig, device: torch.device | str | None = None) -> "RewardModel":
        """Load the trunk named by `cfg.model`, add LoRA (unless `cfg.lora` is off) and a fresh head.

        The head and the adapter are initialised from `cfg.seed`, without touching the global RNG.
        """
        from ..models.loading import load_causal_lm
        from ..models.policy import disable_dropout, lora_targets

        device = torch.device(device) if device is not None else _pick_device(cfg.device)
        lm, tok = load_causal_lm(cfg.model, dtype=torch.float32)
        lm.config.use_cache = False
        # Deterministic scores: the same text must get the same reward (TRL's RewardConfig
        # also disables dropout by default).
        disable_dropout(lm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            if cfg.lora:
                from peft import LoraConfig, get_peft_model

                lcfg = LoraConfig(
                    r=cfg.lora_r,
                    lora_alpha=cfg.lora_alpha,
                    lora_dropout=0.0,
                    target_modules=lora_targets(lm.config.model_type, None),
                    bias="none",
                    task_type="CAUSAL_LM",
                )
                lm = get_peft_model(lm, lcfg)
            model = cls(lm, tok, cfg)
        return model.to(device)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: LoRA + head, or the full LM + head (tied weights once)."""
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        state = self.state_dict()
        return {n: state[n].detach().cpu().clone().contiguous() for n in names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - set(self.state_dict()))
        if missing or unexpected:
            what = f"lacks {len(missing)} tensors, e.g. {missing[0]}" if missing else f"has unknown tensor {unexpected[0]}"
            raise UserError(f"reward model weights do not fit the model: the file {what}", "retrain or check `model` in the json")
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ text → tokens
    def render(self, prompt: str) -> str:
        """The prompt as the trunk sees it: `template`, then the chat template when there is one."""
        from ..models.generation import render_prompt

        return render_prompt(self.tokenizer, self.cfg.template.format(prompt=prompt), chat=True, system_prompt=None)

    def _ids(self, prompt: str, completion: str) -> list[int]:
        tok = self.tokenizer
        shown = self.render(prompt)
        # A rendered chat template already starts with its own special tokens.
        bos = tok.bos_token
        specials = not (bool(bos) and shown.startswith(bos))
        ids = list(tok(shown, add_special_tokens=specials)["input_ids"])
        if completion:
            ids += list(tok(completion, add_special_tokens=False)["input_ids"])
        if len(ids) > self.cfg.max_tokens:
            ids = ids[-self.cfg.max_tokens :]  # keep the end: that is where the score is read
        if not ids:
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id or 0]
        return ids

    def encode(self, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask of `[rendered prompt + completion]`."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        rows = [self._ids(p, c) for p, c in zip(prompts, completions)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ forward passes
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [B]: the head on the final hidden state at each row's last real token.

        Padding is read from `attention_mask` only (the pad id may be a real token too).
        """
        from ..models.policy import position_ids_from_mask

        with self._autocast():
            out = self.lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask),
                output_hidden_states=True,
                use_cache=False,
                logits_to_keep=1,
            )
        h = out.hidden_states[-1]
        last = last_real_index(attention_mask)
        pooled = h[torch.arange(h.shape[0], device=h.device), last].float()
        return self.head(pooled).squeeze(-1)

    def rewards(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """Differentiable rewards of one batch of texts."""
        ids, mask = self.encode(list(prompts), list(completions))
        return self(ids, mask)

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str], batch_size: int = 16) -> list[float]:
        """Rewards of `completions` given `prompts`, batched, without gradients."""
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        was_training = self.training
        self.eval()
        try:
            out: list[float] = []
            for i in range(0, len(prompts), batch_size):
                out += self.rewards(prompts[i : i + batch_size], completions[i : i + batch_size]).tolist()
        finally:
            self.train(was_training)
        return out

    # ------------------------------------------------------------------ online refit
    def fit(
        self,
        prompts: list[str],
        completions: list[str],
        rewards: list[float],
        steps: int = 10,
        batch_size: int = 8,
        lr: float = 1e-4,
    ) -> float:
        """`steps` Adam steps of regression (MSE) on random minibatches of the given triples.

        The optimizer (and its moments) persists between calls, so repeated calls continue
        one optimisation, as a Dyna agent refits its model on fresh experience. Returns the
        mean loss over the steps (0.0 when `steps` is 0 or there is no data).
        """
        prompts, completions, rewards = list(prompts), list(completions), [float(r) for r in rewards]
        if not (len(prompts) == len(completions) == len(rewards)):
            raise ValueError(f"fit: {len(prompts)} prompts, {len(completions)} completions, {len(rewards)} rewards")
        if steps <= 0 or not prompts:
            return 0.0
        params = self.trainable_parameters()
        if self._fit_opt is None:
            self._fit_opt = torch.optim.Adam(params, lr=lr)
        for group in self._fit_opt.param_groups:
            group["lr"] = lr
        was_training = self.training
        self.train()
        total = 0.0
        try:
            n = len(prompts)
            for _ in range(steps):
                idx = self._fit_gen.sample(range(n), min(batch_size, n))
                pred = self.rewards([prompts[i] for i in idx], [completions[i] for i in idx])
                target = torch.tensor([rewards[i] for i in idx], device=pred.device)
                loss = regression_loss(pred, target)
                self._fit_opt.zero_grad(set_to_none=True)
                loss.backward()
                self._fit_opt.step()
                total += float(loss.detach())
        finally:
            self.train(was_training)
        return total / steps


# ---------------------------------------------------------------------------- saving, loading and use
def save_reward_model(model: RewardModel, out_dir: Path | str, metrics: dict | None = None) -> Path:
    """Write the trainable weights and the json atomically.

    Both files go to a temporary folder next to `out_dir`, are flushed, and then the folder
    is renamed to `out_dir`; when `out_dir` already exists each file is renamed into it,
    weights first and the json (which `load_reward_model` reads first) last.
    """
    from safetensors.torch import save_file

    meta = {"format": FORMAT_VERSION, "config": model.cfg.model_dump(), "metrics": metrics or {}}
    return publish_folder(out_dir, {
        WEIGHTS_FILE: lambda p: save_file(model.trainable_state_dict(), str(p)),
        META_FILE: lambda p: p.write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8"),
    }, kind="reward_model")



def load_reward_model(path: Path | str, device: torch.device | str | None = None) -> RewardModel:
    """Rebuild a saved reward model from its folder (or either of its two files)."""
    d, meta = rm_folder.read_meta(path)
    try:
        cfg = RewardModelConfig.model_validate(meta["config"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{d / META_FILE}: not a valid reward model description ({type(exc).__name__})", "retrain the reward model") from None
    model = RewardModel.build(cfg, device=device)
    model.load_trainable_state_dict(rm_folder.read_weights(d))
    model.eval()
    return model


@functools.lru_cache(maxsize=4)
def _cached_model(resolved: str, stamp: int) -> RewardModel:
    # `stamp` (the weights' mtime) makes a retrained model at the same path load afresh.
    return load_reward_model(resolved)


def learned_reward(path: Path | str) -> Callable[..., list[float]]:
    """A reward function `fn(prompts, completions, **kwargs) -> list[float]` scoring with a saved model.

    The model is loaded now (so a bad path fails early) and cached per path.
    """
    d = rm_folder.model_dir(path).resolve()
    weights = d / WEIGHTS_FILE
    stamp = weights.stat().st_mtime_ns if weights.is_file() else 0
    model = _cached_model(str(d), stamp) if stamp else load_reward_model(path)

    def reward(prompts, completions, **kwargs) -> list[float]:
        return model.score(list(prompts), list(completions))

    reward.__name__ = "learned_reward"
    reward.__doc__ = f"Score of the learned reward model at {d}."
    reward.model = model  # type: ignore[attr-defined]
    return reward


def resolve_learned(name: str) -> Callable[..., list[float]] | None:
    """For reward names 'rm:PATH': the reward function of the model saved at PATH; else None."""
    if not name.startswith("rm:"):
        return None
    path = name[3:]
    if not path:
        raise UserError("reward 'rm:' names no reward model", "write rm:PATH/TO/REWARD_MODEL_FOLDER")
    return learned_reward(path)
