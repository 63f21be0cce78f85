"""The environment model P(s', r, done | s, a): a causal LM with a LoRA adapter and two heads.

* **Next observation**: the LM writes the environment's next message given the conversation
  as the environment sees it (envmodel/data.py), trained by teacher-forced NLL on the
  observation's tokens (and the end-of-turn token) only. With the adapter switched off the
  same weights are the *prompted* base model — the baseline it is measured against.
* **Termination**: a logistic head on the last hidden state of the prompt, i.e. after the
  action and before any observation: P(terminated | s, a).
* **Reward**: a linear head on the last hidden state after the observation (or after the
  action when the episode ended there): r(s, a, s'), in units of the training rewards'
  standard deviation around their mean (kept with the model).

One model of the repo's own kind carries the LM (`PolicyValueModel` without a value head),
so the environment model samples with the same `sample` as the policy and loads any
`--model` form.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..config import GenerationConfig, LoraConfig, ModelConfig
from ..models.generation import decode_completions, encode_prompts, render_messages, sample
from ..models.policy import PolicyValueModel, position_ids_from_mask
from .data import environment_view, observation_text, parse_observation

DEFAULT_INSTRUCTION = (
    "You are the environment in this conversation: the other party (a person, a game or a tool). "
    "Reply to the last message as the other party would, in their voice, briefly."
)


def _observation_generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=48, temperature=1.0, top_p=1.0)


class EnvModelConfig(BaseModel):
    """Settings of `dynalm train-env-model` (saved with the model)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field("smollm2-135m-instruct", description="Base LM: hub id, local directory, .gguf file, or the embedded default.")
    lora_r: int = Field(16, ge=1, description="LoRA rank of the environment model's adapter.")
    lora_alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    data: str = Field(..., description="transitions.jsonl (or a run directory holding one).")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of episodes held out (whole episodes, seeded).")
    epochs: int = Field(3, ge=1, description="Passes over the training transitions.")
    batch_size: int = Field(8, ge=1, description="Transitions per gradient step.")
    learning_rate: float = Field(3e-4, gt=0, description="Adam learning rate (adapter and heads).")
    reward_coef: float = Field(1.0, ge=0, description="Weight of the reward head's squared error (standardised rewards).")
    done_coef: float = Field(1.0, ge=0, description="Weight of the termination head's cross-entropy.")
    max_tokens: int = Field(512, ge=16, description="Longest state + action prompt; longer ones lose their start.")
    max_observation_tokens: int = Field(64, ge=1, description="Observation tokens trained on (and written) at most.")
    cap_to_longest_seen: bool = Field(
        True, description="Imagined observations stop at the longest observation the model was trained on "
        "(tokens, its end of turn included), at most max_observation_tokens; false: at max_observation_tokens.")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="The system message that tells the LM it plays the environment.")
    generation: GenerationConfig = Field(
        default_factory=_observation_generation, description="How observations are sampled when the model is an environment."
    )
    seed: int = Field(0, description="Seed of the split, the order and the heads' initialisation.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to run; auto = cuda if available.")


class EnvModel(nn.Module):
    def __init__(self, lm: PolicyValueModel, cfg: EnvModelConfig, reward_mean: float = 0.0, reward_std: float = 1.0):
        super().__init__()
        self.lm = lm
        self.cfg = cfg
        hidden = lm.lm.config.get_text_config().hidden_size
        self.reward_head = nn.Linear(hidden, 1)
        self.done_head = nn.Linear(hidden, 1)
        for h in (self.reward_head, self.done_head):
            nn.init.normal_(h.weight, std=0.1 / math.sqrt(hidden + 1))
            nn.init.zeros_(h.bias)
        self.reward_mean, self.reward_std = float(reward_mean), float(reward_std)
        self.longest_observation: int | None = None  # tokens of the longest observation trained on

    @classmethod
    def build(cls, cfg: EnvModelConfig, device: torch.device | str | None = None) -> "EnvModel":
        mcfg = ModelConfig(name=cfg.model, device=cfg.device, lora=LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            lm = PolicyValueModel.build(mcfg, value_head=False, device=torch.device(device) if device else None)
            model = cls(lm, cfg)
        return model.to(lm.device)

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    @property
    def device(self) -> torch.device:
        return self.lm.device

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter and the two heads (what training changes)."""
        state = {f"lm.{k}": v for k, v in self.lm.trainable_state_dict().items()}
        for name in ("reward_head", "done_head"):
            state.update({f"{name}.{k}": v.detach().clone() for k, v in getattr(self, name).state_dict().items()})
        return state

    def parameters_to_train(self) -> list[nn.Parameter]:
        return self.lm.policy_parameters() + list(self.reward_head.parameters()) + list(self.done_head.parameters())

    # ------------------------------------------------------------------ text → tokens
    def prompt_text(self, state: list[dict], action: str) -> str:
        """The environment's prompt: its instruction and the conversation from its side."""
        return render_messages(self.tokenizer, environment_view(state, action), chat=True, system_prompt=self.cfg.instruction)

    def _chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def target_ids(self, obs: list[dict] | None) -> list[int]:
        """The observation's tokens, ended by the end-of-turn token (none for a terminal step)."""
        if not obs:
            return []
        text = observation_text(obs)
        ids = list(self.tokenizer(text if self._chat() else " " + text, add_special_tokens=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if len(ids) >= self.cfg.max_observation_tokens or eos is None:
            return ids[: self.cfg.max_observation_tokens]
        return ids + [eos]

    def note_observations(self, rows: list[dict]) -> None:
        """Remember the longest observation (in `target_ids` tokens) among these training rows."""
        n = max((len(self.target_ids(r["next_observation"])) for r in rows), default=0)
        self.longest_observation = max(n, self.longest_observation or 0) or None

    def observation_budget(self) -> int:
        """Tokens an imagined observation may take: a model that drifts past its end of turn is
        cut where the longest real observation would have ended."""
        cap = self.cfg.max_observation_tokens
        if self.cfg.cap_to_longest_seen and self.longest_observation:
            cap = min(cap, self.longest_observation)
        return cap

    def _prompt_ids(self, state, action) -> list[int]:
        text = self.prompt_text(state, action)
        bos = self.tokenizer.bos_token
        return list(self.tokenizer(text, add_special_tokens=not (bool(bos) and text.startswith(bos)))["input_ids"])

    def encode(self, rows: list[dict]):
        """Left-padded [prompt + observation] ids, mask, and per row the observation length."""
        seqs, n_obs = [], []
        for r in rows:
            tgt = self.target_ids(r["next_observation"])
            p = self._prompt_ids(r["state"], r["action"])[-(self.cfg.max_tokens) :]
            seqs.append(p + tgt)
            n_obs.append(len(tgt))
        W = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), W), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), W), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, W - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, W - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device), torch.tensor(n_obs, device=self.device)

    # ------------------------------------------------------------------ forward
    def forward_rows(self, rows: list[dict], *, base: bool = False) -> dict[str, torch.Tensor]:
        """Per row: summed observation NLL and its token count, the reward (standardised) and
        termination predictions. `base=True` runs the LM with the adapter off (the prompted baseline)."""
        ids, mask, n_obs = self.encode(rows)
        B, W = ids.shape
        K = int(n_obs.max()) + 1  # logits of the last K positions cover every observation token
        import contextlib

        ctx = self.lm.reference() if base else contextlib.nullcontext(self.lm.lm)
        with ctx as lm, self.lm.autocast():
            out = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                     output_hidden_states=True, use_cache=False, logits_to_keep=K)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)  # predicts the last K-1 tokens
        tok = ids[:, W - K + 1 :]
        nll = -logp.gather(-1, tok[..., None]).squeeze(-1)
        j = torch.arange(K - 1, device=ids.device)
        obs_mask = (j[None, :] >= (K - 1 - n_obs)[:, None]).float()
        h = out.hidden_states[-1].float()
        rows_i = torch.arange(B, device=ids.device)
        h_prompt = h[rows_i, W - 1 - n_obs]  # the last token before the observation
        h_last = h[:, -1]
        return {
            "nll": (nll * obs_mask).sum(-1),
            "tokens": obs_mask.sum(-1),
            "reward_z": self.reward_head(h_last).squeeze(-1),
            "done_logit": self.done_head(h_prompt).squeeze(-1),
        }

    def loss(self, rows: list[dict]) -> tuple[torch.Tensor, dict[str, float]]:
        out = self.forward_rows(rows)
        n_tok = out["tokens"].sum()
        nll = out["nll"].sum() / n_tok.clamp(min=1.0)
        z = torch.tensor([(float(r["reward"]) - self.reward_mean) / self.reward_std for r in rows], device=self.device)
        done = torch.tensor([float(bool(r["terminated"])) for r in rows], device=self.device)
        r_loss = F.mse_loss(out["reward_z"], z)
        d_loss = F.binary_cross_entropy_with_logits(out["done_logit"], done)
        total = nll + self.cfg.reward_coef * r_loss + self.cfg.done_coef * d_loss
        return total, {"nll": float(nll.detach()), "reward_mse": float(r_loss.detach()), "done_bce": float(d_loss.detach())}

    def reward_of(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.reward_std + self.reward_mean

    # ------------------------------------------------------------------ the model as an environment
    @torch.no_grad()
    def step(self, states: list[list[dict]], actions: list[str], generator: torch.Generator | None = None):
        """One imagined environment step per (state, action): (observations — chat messages,
        None where the model ends the episode —, rewards, terminated). Termination is
        P(done | s, a) > 1/2; observations are sampled with `cfg.generation`, for at most
        `observation_budget()` tokens."""
        was = self.training
        self.eval()
        try:
            rows = [{"state": s, "action": a, "next_observation": None} for s, a in zip(states, actions)]
            first = self.forward_rows(rows)
            terminated = (first["done_logit"] > 0).tolist()
            rewards = self.reward_of(first["reward_z"]).tolist()
            go = [i for i, t in enumerate(terminated) if not t]
            obs: list[list[dict] | None] = [None] * len(rows)
            if go:
                texts = [self.prompt_text(states[i], actions[i]) for i in go]
                ids, mask, _ = encode_prompts(self.tokenizer, texts, self.cfg.max_tokens, self.device)
                gen = self.cfg.generation.model_copy(update={"max_new_tokens": self.observation_budget()})
                out_ids, _, amask, _, _, ended = sample(self.lm, ids, mask, gen, generator=generator, with_values=False)
                for i, text in zip(go, decode_completions(self.tokenizer, out_ids, amask, ended)):
                    obs[i] = parse_observation(text) if text else [{"role": "user", "content": ""}]
                second = self.forward_rows([{**rows[i], "next_observation": obs[i]} for i in go])
                for i, v in zip(go, self.reward_of(second["reward_z"]).tolist()):
                    rewards[i] = v
        finally:
            self.train(was)
        return obs, rewards, terminated
