"""Batched sampling with a KV cache.

One prefill over the left-padded prompts, then one incremental forward per new token.
The same pass records log π(a_t|s_t) (at the sampling temperature, before top-k/top-p
truncation, as TRL does) and V(s_t), so the update needs no extra forward for them.
"""

from __future__ import annotations

import torch

from ..config import GenerationConfig
from ..models.policy import PolicyValueModel, position_ids_from_mask
from .batch import Batch


def render_prompt(tokenizer, text: str, *, chat: bool, system_prompt: str | None) -> str:
    """The string the model sees: the chat template when the tokenizer has one."""
    if chat and getattr(tokenizer, "chat_template", None):
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": text})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def encode_prompts(tokenizer, texts: list[str], max_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Left-pad token ids; returns (ids, mask, n_truncated)."""
    rows = []
    truncated = 0
    for t in texts:
        ids = tokenizer(t, add_special_tokens=not _has_bos(tokenizer, t))["input_ids"]
        if len(ids) > max_tokens:
            ids = ids[-max_tokens:]
            truncated += 1
        if not ids:
            ids = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id]
        rows.append(ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device), truncated


def _has_bos(tokenizer, text: str) -> bool:
    # Chat templates already start with their own special tokens.
    bos = tokenizer.bos_token
    return bool(bos) and text.startswith(bos)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask all but the top-k tokens and the smallest set with mass ≥ top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (keeps at least one)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def stop_ids(tokenizer, generation_config=None) -> set[int]:
    """The tokenizer's EOS plus the model's generation_config EOS ids (chat models often list
    their end-of-turn token there)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    extra = getattr(generation_config, "eos_token_id", None)
    for t in extra if isinstance(extra, (list, tuple)) else [extra]:
        if t is not None and 0 <= int(t) < len(tokenizer):
            ids.add(int(t))
    return ids


@torch.no_grad()
def sample(
    model: PolicyValueModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    gen: GenerationConfig,
    *,
    generator: torch.Generator | None = None,
    with_values: bool = True,
    use_reference: bool = False,
    greedy: bool = False,
):
    """Sample completions. Returns (input_ids, attention_mask, action_mask, logprobs, values, ended)."""
    import contextlib

    B, P = prompt_ids.shape
    T = gen.max_new_tokens
    device = prompt_ids.device
    stops = (
        torch.tensor(sorted(stop_ids(model.tokenizer, getattr(model.lm, "generation_config", None))), dtype=torch.long, device=device)
        if gen.stop_at_eos
        else None
    )
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0

    ids = torch.full((B, P + T), pad, dtype=torch.long, device=device)
    ids[:, :P] = prompt_ids
    attn = torch.zeros((B, P + T), dtype=torch.long, device=device)
    attn[:, :P] = prompt_mask
    action_mask = torch.zeros((B, T), dtype=torch.float32, device=device)
    logprobs = torch.zeros((B, T), dtype=torch.float32, device=device)
    values = torch.zeros((B, T), dtype=torch.float32, device=device) if with_values and model.value_head is not None else None
    alive = torch.ones(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)

    ctx = model.reference() if use_reference else contextlib.nullcontext(model.lm)
    was_training = model.training
    model.eval()
    try:
        with ctx as lm:
            cur_ids, past = prompt_ids, None
            pos_all = position_ids_from_mask(attn[:, :P])
            cur_pos = pos_all
            next_pos = pos_all[:, -1] + 1
            n_done = 0
            for t in range(T):
                logits, v, past = model.step_logits(
                    lm, cur_ids, attn[:, : P + t], cur_pos, past, want_values=values is not None
                )
                logits = logits / gen.temperature
                logp_all = torch.log_softmax(logits, dim=-1)
                if greedy:
                    tok = logits.argmax(-1)
                else:
                    probs = torch.softmax(filter_logits(logits, gen.top_k, gen.top_p), dim=-1)
                    tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                tok = torch.where(alive, tok, torch.full_like(tok, pad))
                ids[:, P + t] = tok
                attn[:, P + t] = alive.long()
                action_mask[:, t] = alive.float()
                logprobs[:, t] = torch.where(alive, logp_all.gather(-1, tok[:, None]).squeeze(-1), 0.0)
                if values is not None:
                    values[:, t] = torch.where(alive, v, 0.0)
                n_done = t + 1
                if stops is not None:
                    hit = alive & torch.isin(tok, stops)
                    ended |= hit
                    alive &= ~hit
                if not alive.any():
                    break
                cur_ids, cur_pos = tok[:, None], next_pos[:, None]
                next_pos = next_pos + 1
    finally:
        model.train(was_training)
    # trim columns no row used
    keep = P + n_done
    return (
        ids[:, :keep],
        attn[:, :keep],
        action_mask[:, :n_done],
        logprobs[:, :n_done],
        values[:, :n_done] if values is not None else None,
        ended,
    )


def decode_completions(tokenizer, ids: torch.Tensor, action_mask: torch.Tensor, ended: torch.Tensor) -> list[str]:
    T = action_mask.shape[1]
    out = []
    for row, m, e in zip(ids[:, -T:].tolist(), action_mask.tolist(), ended.tolist()):
        n = int(sum(m))
        toks = row[: n - 1] if e and n > 0 else row[:n]  # drop the EOS token itself
        out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out


def rollout(
    model: PolicyValueModel,
    rows: list[dict],
    rendered: list[str],
    gen: GenerationConfig,
    *,
    max_prompt_tokens: int,
    group: list[int],
    prompt_field: str = "prompt",
    generator: torch.Generator | None = None,
) -> tuple[Batch, int]:
    """Sample one completion per entry of `rendered`; returns (batch, n_truncated_prompts)."""
    p_ids, p_mask, truncated = encode_prompts(model.tokenizer, rendered, max_prompt_tokens, model.device)
    ids, attn, amask, logp, values, ended = sample(model, p_ids, p_mask, gen, generator=generator)
    completions = decode_completions(model.tokenizer, ids, amask, ended)
    extra_keys = sorted({k for r in rows for k in r if k != prompt_field})
    batch = Batch(
        input_ids=ids,
        attention_mask=attn,
        action_mask=amask,
        logprobs=logp,
        values=values,
        prompts=[str(r[prompt_field]) for r in rows],
        completions=completions,
        group=torch.tensor(group, dtype=torch.long, device=ids.device),
        ended=ended,
        extras={k: [r.get(k) for r in rows] for k in extra_keys},
    )
    return batch, truncated
