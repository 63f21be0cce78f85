"""Key/value caches for a search tree over token prefixes.

A tree node stores only the K/V of its own token ([1, heads, 1, head_dim] per layer); the
root stores the prompt's. To evaluate a leaf we join root + ancestors into one DynamicCache
and forward the leaf's single token: one incremental forward per simulation instead of a
forward over the whole prefix. Batch size is 1 and there is no padding, so positions are
simply 0..L-1 and the attention mask is all ones.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..errors import UserError

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values), each [1, heads, len, head_dim]


def cache_to_kv(cache) -> KV:
    """Per-layer tensors of a plain DynamicCache (full attention on every layer)."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers or []}) or [type(cache).__name__]
        # Sliding-window / linear-attention layers keep state we cannot split per token.
        raise UserError(
            f"planner 'mcts' needs a model whose KV cache has only full-attention layers, got {', '.join(kinds)}",
            "use planner 'best-of-n' for this model",
        )
    return [(layer.keys, layer.values) for layer in layers]


def kv_to_cache(kv: KV) -> DynamicCache:
    # The constructor copies the tensors into fresh layers; the model then appends to those
    # copies, so the tree's own tensors are never modified.
    return DynamicCache(ddp_cache_data=kv)


def join(prefix: KV, pieces: list[KV]) -> KV:
    """prefix followed by each piece, along the sequence axis."""
    if not pieces:
        return prefix
    return [
        (torch.cat([k] + [p[i][0] for p in pieces], dim=-2), torch.cat([v] + [p[i][1] for p in pieces], dim=-2))
        for i, (k, v) in enumerate(prefix)
    ]


def last_token(kv: KV) -> KV:
    # clone: a slice would keep the whole joined prefix alive in memory
    return [(k[..., -1:, :].clone(), v[..., -1:, :].clone()) for k, v in kv]


def length(kv: KV) -> int:
    return kv[0][0].shape[-2]


def prefill(model, lm, ids: torch.Tensor, want_values: bool):
    """Forward a whole (unpadded, batch-1) prompt: (logits [V], value or None, prompt KV)."""
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    logits, values, past = model.step_logits(lm, ids, mask, pos, None, want_values=want_values)
    return logits[0], (float(values[0]) if values is not None else None), cache_to_kv(past)


def extend(model, lm, prefix: KV, token: int, want_values: bool):
    """Forward one token after `prefix`: (logits [V], value or None, the token's own KV)."""
    L = length(prefix)
    device = prefix[0][0].device
    ids = torch.tensor([[token]], device=device)
    mask = torch.ones((1, L + 1), dtype=torch.long, device=device)
    pos = torch.tensor([[L]], device=device)
    logits, values, past = model.step_logits(lm, ids, mask, pos, kv_to_cache(prefix), want_values=want_values)
    return logits[0], (float(values[0]) if values is not None else None), last_token(cache_to_kv(past))
