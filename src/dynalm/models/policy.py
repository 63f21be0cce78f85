"""The policy π(a|s) — a causal LM — and the critic V(s): a linear head on a last hidden layer.

The article (section 3.3) puts the value network on the policy's own trunk; that is the
default (`model.critic: head`); `adapter` and `model` give the critic a trunk of its own
(models/critic.py). With LoRA the reference policy is the same weights with the adapter disabled, so there
is one copy of the model in memory. With full fine-tuning a frozen copy is kept.
"""

from __future__ import annotations

import contextlib
import copy
from functools import partial
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint
from torch import nn

from ..config import Config, ModelConfig
from ..errors import UserError
from .critic import CRITIC_ADAPTER, ValueNorm, adapter_active, add_critic_adapter, build_critic_lm, same_vocabulary
from .head import float32_head, head_logprobs, logprobs_of
from .loading import disable_dropout, load_causal_lm, lora_targets  # noqa: F401 (re-exported)

@dataclass
class ForwardOut:
    logprobs: torch.Tensor  # [B, T] log π(a_t | s_t) of the given actions
    values: torch.Tensor | None  # [B, T] V(s_t)
    entropy: torch.Tensor | None  # [B, T]
    hidden: torch.Tensor | None = None  # [B, L, H] last hidden layer, when asked for


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


class PolicyValueModel(nn.Module):
    """A causal LM policy with an optional value head and a reference policy."""

    def __init__(
        self, lm: nn.Module, tokenizer, *, lora: bool, value_head: bool, ref_lm: nn.Module | None = None,
        critic: str = "head", critic_lm: nn.Module | None = None, critic_head: nn.Linear | None = None,
        value_norm: bool = False,
    ):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.lora = lora
        self.ref_lm = ref_lm
        # A side critic (beside grpo/rloo) reads the trunk's features without moving them,
        # so the policy trains exactly as it would without a value head.
        self.value_detached = False
        self.logits_chunk = 0  # rows per LM-head chunk in a training forward (train.logits_chunk); 0 = one piece
        # The KL coefficient β of the run that trained this model, when it came from one (its
        # adapted value at the end): the per-token rewards the value head learned to predict
        # include −β·KL_t, so the per-token view and the planner's leaf scores use the same β.
        self.trained_beta: float | None = None
        hidden = lm.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1) if value_head else None
        if self.value_head is not None:
            # Small init keeps early values near zero, so early advantages ≈ rewards.
            nn.init.normal_(self.value_head.weight, std=1.0 / (hidden + 1) ** 0.5 * 0.1)
            nn.init.zeros_(self.value_head.bias)
        if critic_head is not None:  # a train-rm reward model's head (model.critic_init)
            self.value_head = critic_head
        # Where V(s)'s features come from: the policy's trunk, its second adapter, or a model of its own.
        self.critic_kind = critic if self.value_head is not None else "head"
        self.critic_lm = critic_lm
        self._critic_adapter = [p for n, p in lm.named_parameters() if f".{CRITIC_ADAPTER}." in n]
        self.value_norm = ValueNorm() if value_norm and self.value_head is not None else None
        if ref_lm is not None:
            ref_lm.requires_grad_(False).eval()
        # Mixed precision: None = bfloat16 autocast on CUDA, none on CPU; tests set it to run
        # the bf16 path on a CPU. The LM head always runs on a float32 hidden state.
        self.amp_dtype: torch.dtype | None = None
        for m in (lm, ref_lm):
            if m is not None:
                float32_head(m)
        # What training changes, fixed now: peft's disable_adapter (the reference pass) and
        # set_adapter flip requires_grad on adapters, so it cannot be read back later.
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        self._trainable |= {f"value_norm.{b}" for b, _ in (self.value_norm.named_buffers() if self.value_norm else [])}
        self._value_names = {
            n for n in self._trainable
            if n.startswith(("value_head.", "critic_lm.", "value_norm.")) or f".{CRITIC_ADAPTER}." in n
        }

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | None = None) -> "PolicyValueModel":
        model = cls.build(cfg.model, value_head=cfg.use_value_head, device=device, value_norm=cfg.algorithm.value_norm)
        model.value_detached = not cfg.algorithm.needs_value_head
        model.logits_chunk = cfg.train.logits_chunk
        if model.logits_chunk:
            # the chunked path applies the output embedding alone; a model that post-processes its
            # logits (Gemma-2/3's soft-capping, Cohere's and Granite's scaling) would train on other log-probs
            lm_cfg = model.lm.config
            post = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                    if getattr(lm_cfg, k, None) not in (None, 1, 1.0)]
            if post:
                raise UserError(f"train.logits_chunk cannot be used with model_type {lm_cfg.model_type}: it transforms its logits ({', '.join(post)})",
                                "set train.logits_chunk=0")
        if cfg.train.gradient_checkpointing:
            model.enable_checkpointing()
        return model

    def enable_checkpointing(self) -> None:
        """Activation checkpointing per decoder layer in every trained LM (transformers' own,
        non-reentrant, so frozen inputs need no requires_grad); only while training: sampling
        and no-grad passes run the model in eval mode, where it is off."""
        if self.critic_kind == "adapter":
            # the backward's recompute would run after the critic's pass has switched the
            # adapter back: the critic's layers would be recomputed with the policy's adapter
            raise UserError("train.gradient_checkpointing does not work with model.critic: adapter",
                            "use model.critic: head or model, or set train.gradient_checkpointing: false")
        for lm in (self.lm, self.critic_lm):
            if lm is not None:
                base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
                if not getattr(base, "supports_gradient_checkpointing", False):
                    raise UserError(f"train.gradient_checkpointing: {type(base).__name__} does not support it",
                                    "set train.gradient_checkpointing: false")
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @classmethod
    def build(
        cls, mcfg: ModelConfig, *, value_head: bool, device: torch.device | None = None, frozen: bool = False,
        value_norm: bool = False,
    ) -> "PolicyValueModel":
        """`frozen=True` loads the LM alone for inference: no adapter, no reference copy, no critic."""
        device = device or pick_device(mcfg.device)
        lm, tok = load_causal_lm(mcfg.name, dtype=torch.float32)
        lm.config.use_cache = True
        disable_dropout(lm)
        ref = None
        if frozen:
            lm.requires_grad_(False)
        elif mcfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=mcfg.lora.r,
                lora_alpha=mcfg.lora.alpha,
                lora_dropout=0.0,  # no dropout: rollout and update log-probs must agree
                target_modules=lora_targets(lm.config.model_type, mcfg.lora.target_modules),
                bias="none",
                task_type="CAUSAL_LM",
            )
            lm = get_peft_model(lm, lcfg)
        else:
            ref = copy.deepcopy(lm)
        kind = mcfg.critic if value_head and not frozen else "head"
        critic_lm = critic_head = None
        if kind == "adapter":
            add_critic_adapter(lm, mcfg.lora)
        elif kind == "model":
            critic_lm, critic_head, critic_tok = build_critic_lm(mcfg)
            if not same_vocabulary(tok, critic_tok):
                raise UserError(
                    f"the critic model '{mcfg.critic_init or mcfg.critic_model}' has another tokenizer than the policy "
                    f"'{mcfg.name}'", "use a critic built on the policy's model family (it reads the policy's token ids)"
                )
        model = cls(
            lm, tok, lora=mcfg.lora.enabled and not frozen, value_head=value_head, ref_lm=ref,
            critic=kind, critic_lm=critic_lm, critic_head=critic_head, value_norm=value_norm,
        )
        return model.to(device)

    @property
    def is_reference(self) -> bool:
        """True for a model loaded as is (frozen=True): the policy is its own reference."""
        return not self.lora and self.ref_lm is None

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def autocast(self):
        dev = self.device.type
        dtype = self.amp_dtype or (torch.bfloat16 if dev == "cuda" else None)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(dev, dtype=dtype)

    # ------------------------------------------------------------------ parameters
    def policy_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n in self._trainable and n not in self._value_names]

    def value_parameters(self) -> list[nn.Parameter]:
        """The critic's: its head, plus its adapter or its own model's trainable weights."""
        return [p for n, p in self.named_parameters() if n in self._value_names]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes: LoRA weights (or the full LM), the critic, its statistics."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in self._trainable}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [k for k in self.trainable_state_dict() if k not in state]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ forward passes
    @contextlib.contextmanager
    def reference(self):
        """Yield the reference LM: the adapter switched off, or the frozen copy."""
        if self.lora:
            try:
                with self.lm.disable_adapter():
                    yield self.lm
            finally:  # peft re-enables only the active (policy's) adapter's gradients
                for p in self._critic_adapter:
                    p.requires_grad_(True)
        else:
            yield self.ref_lm if self.ref_lm is not None else self.lm

    def _run(
        self, lm, input_ids, attention_mask, n_actions: int, temperature: float, want_values: bool, want_entropy: bool,
        want_hidden: bool = False, entropy_grad: bool = True,
    ):
        pos = position_ids_from_mask(attention_mask)
        B = input_ids.shape[0]
        # the update, and the no-grad passes over the whole batch (reference, recompute), whose
        # [B, tokens, vocab] logits would otherwise be the step's largest tensor
        chunked = bool(self.logits_chunk) and B > self.logits_chunk
        keep = 1 if chunked else n_actions + 1
        with self.autocast():
            out = lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=pos,
                output_hidden_states=(want_values and self.critic_kind == "head") or want_hidden or chunked,
                use_cache=False,
                logits_to_keep=keep,
            )
        if out.logits.shape[1] != keep:  # a model that ignores logits_to_keep would misalign silently
            raise RuntimeError(f"{type(lm).__name__} ignored logits_to_keep ({out.logits.shape[1]} positions, wanted {keep})")
        actions = input_ids[:, -n_actions:]
        want_entropy_grad = torch.is_grad_enabled() and entropy_grad
        if chunked:
            # the head's input at the positions that predict the actions; each chunk's logits
            # live only inside the checkpointed function, in the forward and again in the backward
            h = out.hidden_states[-1][:, -n_actions - 1 : -1]
            head = lm.get_output_embeddings()
            run = partial(checkpoint, head_logprobs, use_reentrant=False) if torch.is_grad_enabled() else head_logprobs
            parts = [
                run(head, h[i : i + self.logits_chunk], actions[i : i + self.logits_chunk], temperature, want_entropy,
                    want_entropy_grad)
                for i in range(0, B, self.logits_chunk)
            ]
            logprobs = torch.cat([p[0] for p in parts])
            entropy = torch.cat([p[1] for p in parts]) if want_entropy else None
        else:
            # logits at position p predict token p+1: the last n_actions+1 positions minus the final one
            logprobs, entropy = logprobs_of(out.logits[:, :-1], actions, temperature, want_entropy, want_entropy_grad)
        values = None
        if want_values and self.critic_kind == "head":
            h = out.hidden_states[-1][:, -n_actions - 1 : -1].float()
            values = self._value(h.detach() if self.value_detached else h)
        elif want_values:
            values = self.critic_values(input_ids, attention_mask, n_actions)
        return ForwardOut(logprobs, values, entropy, out.hidden_states[-1].float() if want_hidden else None)

    def forward(
        self, input_ids, attention_mask, n_actions: int, temperature: float = 1.0, entropy: bool = True,
        entropy_grad: bool = True,
    ) -> ForwardOut:
        """Log-probs of the last `n_actions` tokens, V(s_t) before each, and entropies
        (without a graph when `entropy_grad` is false: a metric, not a loss term)."""
        return self._run(
            self.lm, input_ids, attention_mask, n_actions, temperature, self.value_head is not None, entropy,
            entropy_grad=entropy_grad,
        )

    # ------------------------------------------------------------------ the critic
    def _value(self, h: torch.Tensor) -> torch.Tensor:
        v = self.value_head(h).squeeze(-1)
        return self.value_norm(v) if self.value_norm is not None else v

    @contextlib.contextmanager
    def critic_trunk(self):
        """The LM whose last hidden layer the critic reads, set up for the pass (adapter: active)."""
        if self.critic_kind == "adapter":
            with adapter_active(self.lm, CRITIC_ADAPTER, self._critic_adapter):
                yield self.lm
        else:
            yield self.lm if self.critic_kind == "head" else self.critic_lm

    def critic_hidden(self, input_ids, attention_mask) -> torch.Tensor:
        """The last hidden layer the critic reads, at every position [B, L, H] (float32)."""
        with self.critic_trunk() as lm, self.autocast():
            out = lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                output_hidden_states=True, use_cache=False, logits_to_keep=1,
            )
        return out.hidden_states[-1].float()

    def state_values(self, input_ids, attention_mask, detach_trunk: bool = False) -> torch.Tensor:
        """V(s) after every prefix [B, L]: position p holds V of the text up to token p."""
        h = self.critic_hidden(input_ids, attention_mask)
        return self._value(h.detach() if detach_trunk or (self.critic_kind == "head" and self.value_detached) else h)

    def critic_values(self, input_ids, attention_mask, n_actions: int, detach_trunk: bool = False) -> torch.Tensor:
        """V(s_t) before each of the last `n_actions` tokens [B, n_actions], from the critic's own pass."""
        return self.state_values(input_ids, attention_mask, detach_trunk)[:, -n_actions - 1 : -1]

    @torch.no_grad()
    def reference_logprobs(self, input_ids, attention_mask, n_actions: int, temperature: float = 1.0) -> torch.Tensor:
        with self.reference() as ref:
            return self._run(ref, input_ids, attention_mask, n_actions, temperature, False, False).logprobs

    @torch.no_grad()
    def reference_logprobs_and_features(
        self, input_ids, attention_mask, n_actions: int, action_mask: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference log-probs plus pooled features of the frozen reference trunk, from the
        same forward pass: [mean over completion tokens, last completion token, mean prompt ⊙
        mean completion] of the last hidden layer, [B, 3·hidden] (Dyna's reward-model input)."""
        with self.reference() as ref:
            out = self._run(ref, input_ids, attention_mask, n_actions, temperature, False, False, want_hidden=True)
        logprobs, h = out.logprobs, out.hidden
        comp_h = h[:, -n_actions:]
        am = action_mask.to(h.dtype)
        n = am.sum(-1, keepdim=True).clamp(min=1.0)
        comp_mean = (comp_h * am[..., None]).sum(1) / n
        last = (am.sum(-1).long() - 1).clamp(min=0)
        comp_last = comp_h[torch.arange(h.shape[0], device=h.device), last]
        pm = attention_mask[:, : h.shape[1] - n_actions].to(h.dtype)
        prompt_mean = (h[:, : h.shape[1] - n_actions] * pm[..., None]).sum(1) / pm.sum(-1, keepdim=True).clamp(min=1.0)
        return logprobs, torch.cat([comp_mean, comp_last, prompt_mean * comp_mean], dim=-1)

    @torch.no_grad()
    def step_logits(self, lm, input_ids, attention_mask, position_ids, past, want_values: bool):
        """One incremental forward with the KV cache; returns last-position logits, values, cache."""
        with self.autocast():
            out = lm(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past,
                use_cache=True,
                output_hidden_states=want_values,
                logits_to_keep=1,
            )
        logits = out.logits[:, -1].float()
        values = None
        if want_values and self.value_head is not None and self.critic_kind == "head":
            values = self._value(out.hidden_states[-1][:, -1].float())
        return logits, values, out.past_key_values

    # ------------------------------------------------------------------ export
    def save_merged_lm(self, out_dir) -> None:
        """The policy as a plain transformers folder (LoRA merged into a copy) with its tokenizer."""
        merged = copy.deepcopy(self.lm).merge_and_unload(adapter_names=["default"]) if self.lora else self.lm
        merged.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)

    @torch.no_grad()
    def merged_weights(self):
        """(transformers name, tensor) of every weight the policy's training changes, with the
        LoRA delta merged: W + s·B·A for an adapted projection (base weights untouched). Without
        LoRA, every trainable weight of the LM. For a rollout engine that holds its own copy."""
        if not self.lora:
            for name, p in self.lm.named_parameters():
                if p.requires_grad:
                    yield name, p.detach()
            return
        from peft.tuners.lora import LoraLayer

        for name, mod in self.lm.named_modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                clean = name.removeprefix("base_model.model.")
                yield f"{clean}.weight", mod.get_base_layer().weight.detach() + mod.get_delta_weight("default")

    def export(self, out_dir) -> None:
        """Save a plain transformers model (the policy's LoRA merged) plus the critic:
        `value_head.safetensors` (V = weight·h + bias on the trunk's last hidden layer, value
        normalisation folded in); a critic with its own trunk also writes `critic.safetensors`
        (its adapter or model weights)."""
        from safetensors.torch import save_file

        self.save_merged_lm(out_dir)
        if self.value_head is not None:
            w, b = self.value_head.weight.detach(), self.value_head.bias.detach()
            if self.value_norm is not None:  # V = σ(w·h + b) + μ
                w, b = w * self.value_norm.std, b * self.value_norm.std + self.value_norm.mean
            save_file({"weight": w.cpu().contiguous(), "bias": b.cpu().contiguous()}, f"{out_dir}/value_head.safetensors")
        if self.critic_kind != "head":
            own = {k: v for k, v in self.trainable_state_dict().items() if k in self._value_names and not k.startswith("value_")}
            save_file({k: v.cpu().contiguous() for k, v in own.items()}, f"{out_dir}/critic.safetensors")
