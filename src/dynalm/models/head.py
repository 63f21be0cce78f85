"""The LM head: its projection in float32, and the log-probabilities (and entropy) of the
actions taken, the update's largest tensors."""

from __future__ import annotations

import types

import torch
from torch import nn


def float32_head(lm: nn.Module) -> None:
    """Run `lm`'s output projection in float32, outside autocast: in bfloat16, logits near 20
    round to steps of 0.125, which is noise in every log-prob, ratio and KL. The module is
    patched in place (its forward only), so weights, tying and saving are unchanged."""
    head = lm.get_output_embeddings()
    if not isinstance(head, nn.Linear) or getattr(head, "_dynalm_fp32", False):
        return

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            b = self.bias.float() if self.bias is not None else None
            return nn.functional.linear(x.float(), self.weight.float(), b)

    head.forward = types.MethodType(forward, head)
    head._dynalm_fp32 = True


def logprobs_of(logits, actions, temperature: float, want_entropy: bool, entropy_grad: bool):
    """log π(a_t) and the entropy at each position. [B, T, vocab] tensors are the update's
    largest (49k columns for SmolLM2): no copy for temperature 1, and an entropy that only
    feeds a metric keeps no graph."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    if not want_entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad):
        return logprobs, -(logp_all.exp() * logp_all).sum(-1)


def head_logprobs(head, h, actions, temperature: float, want_entropy: bool, entropy_grad: bool):
    return logprobs_of(head(h), actions, temperature, want_entropy, entropy_grad)
