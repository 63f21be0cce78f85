"""Text generation, for every part that writes text: render, encode, sample, decode.

The chat template renders a prompt or a whole conversation; `glue_text` is the text that
continues a conversation after a sampled assistant turn (the template's end of that turn,
the new messages, the cue for the next one), so a multi-turn episode is built from token
ids and never re-tokenised. `sample` is one prefill over the distinct left-padded prompts (rows that repeat a prompt
share its KV cache) and one
incremental forward per new token with the KV cache; the same pass records log π(a_t|s_t)
(at the sampling temperature, before top-k/top-p truncation, as TRL does) and V(s_t).
`sample_turn` does the same after a `TurnCache`, the cache a previous turn left, so that a
multi-turn episode prefills only its new tokens each turn.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..config import GenerationConfig
from ..errors import UserError
from .fastdecode import decoder_for
from .policy import PolicyValueModel, position_ids_from_mask

_SENTINEL = "@@DYNALM-ASSISTANT-TURN@@"
_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "tool": "Tool", "system": "System"}


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
    ids, mask = left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0, device)
    return ids, mask, truncated


def left_pad(rows: list[list[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as left-padded (ids, attention mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


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


@dataclass
class TurnCache:
    """The KV cache a sampled turn leaves behind, per row: keys and values [B, kv heads, S,
    head dim] per layer of the first S columns of `ids` — every column the model has read.
    The turn's last sampled token has not been read yet (nothing was sampled after it), so it
    opens the next turn's new tokens. Masked columns (left padding, a row that stopped early)
    stay in place as holes that no row attends to."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    ids: torch.Tensor  # [B, S]
    mask: torch.Tensor  # [B, S]

    def select(self, rows: list[int]) -> "TurnCache":
        idx = torch.tensor(rows, dtype=torch.long, device=self.ids.device)
        return TurnCache([(k[idx], v[idx]) for k, v in self.kv], self.ids[idx], self.mask[idx])

    def pending(self, ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Per row, the tokens of a sampled `ids`/`mask` (the whole turn's output) that this
        cache has not read: the last column, where it is a real token of that row."""
        S = self.ids.shape[1]
        return [ids[j, S:].tolist() if int(mask[j, S:].sum()) else [] for j in range(ids.shape[0])]

    def reuse(self, prompts: list[list[int]]) -> tuple["TurnCache | None", list[list[int]]]:
        """Prefix reuse for a prompt rebuilt from text (a user simulator's re-rendered chat):
        per row, the longest common prefix of the tokens this cache has read and `prompts[j]`
        stays readable, the cache's columns after it become holes, and the rest of the prompt
        is what the next prefill reads (at least its last token, which gives the first logits).
        Returns (that cache, the tokens to prefill per row); (None, prompts) when no row shares
        a single token with its cache, so a plain prefill is no worse."""
        if len(prompts) != self.ids.shape[0]:
            raise ValueError(f"the turn cache holds {self.ids.shape[0]} rows, the prompts {len(prompts)}")
        mask = self.mask.clone()
        rest, shared = [], 0
        for j, p in enumerate(prompts):
            cols = self.mask[j].nonzero().flatten()
            read = self.ids[j, cols].tolist()
            n = 0
            limit = min(len(read), len(p) - 1)
            while n < limit and read[n] == p[n]:
                n += 1
            mask[j, cols[n:]] = 0
            rest.append(p[n:])
            shared += n
        if shared == 0:
            return None, prompts
        return TurnCache(self.kv, self.ids, mask), rest


def _turn_cache(past, ids: torch.Tensor, attn: torch.Tensor, S: int) -> TurnCache | None:
    """The cache after a turn as plain per-layer tensors (None for cache types it cannot carry,
    e.g. sliding windows or linear-attention states)."""
    if isinstance(past, list):  # the fast decoder's static buffers, S slots written
        kv = [(k[:, :, :S], v[:, :, :S]) for k, v in past]
    else:
        layers = getattr(past, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            return None
        kv = [(layer.keys, layer.values) for layer in layers]
        if kv[0][0].shape[2] != S or kv[0][0].shape[0] != ids.shape[0]:
            return None
    return TurnCache(kv, ids[:, :S], attn[:, :S])


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
    return _sample(model, prompt_ids, prompt_mask, gen, generator, with_values, use_reference, greedy, None, False)[0]


@torch.no_grad()
def sample_turn(
    model: PolicyValueModel,
    new_ids: torch.Tensor,
    new_mask: torch.Tensor,
    gen: GenerationConfig,
    prefix: TurnCache | None,
    *,
    generator: torch.Generator | None = None,
    with_values: bool = True,
    use_reference: bool = False,
):
    """`sample` after `prefix` (the cache of the same rows' earlier turns, or None): only the
    left-padded `new_ids` are prefilled, and the returned ids and masks hold prefix + new +
    sampled columns. Returns (sample's six results, the TurnCache for the next turn or None)."""
    if prefix is not None and prefix.ids.shape[0] != new_ids.shape[0]:
        raise ValueError(f"the turn cache holds {prefix.ids.shape[0]} rows, the new tokens {new_ids.shape[0]}")
    return _sample(model, new_ids, new_mask, gen, generator, with_values, use_reference, False, prefix, True)


def completion_buffers(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, T: int, tokenizer):
    """A batch's buffers for T completion columns after the left-padded prompts: ids (padded
    with the pad token), attention mask (the prompt's), action mask and log-probs (zeros)."""
    B, P = prompt_ids.shape
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((B, P + T), pad, dtype=torch.long, device=prompt_ids.device)
    ids[:, :P] = prompt_ids
    attn = torch.zeros((B, P + T), dtype=torch.long, device=prompt_ids.device)
    attn[:, :P] = prompt_mask
    zeros = torch.zeros((B, T), dtype=torch.float32, device=prompt_ids.device)
    return ids, attn, zeros, zeros.clone()


def assemble_completions(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, token_lists: list[list[int]], T: int, tokenizer):
    """[prompt | completion] rows from each row's completion tokens (T columns, right-padded):
    `completion_buffers` with the tokens, their attention and action mask filled in; the
    log-probs are left at zero for the caller."""
    ids, attn, amask, logp = completion_buffers(prompt_ids, prompt_mask, T, tokenizer)
    P = prompt_ids.shape[1]
    for i, toks in enumerate(token_lists):
        n = len(toks)
        ids[i, P : P + n] = torch.tensor(toks, dtype=torch.long)
        attn[i, P : P + n] = 1
        amask[i, :n] = 1.0
    return ids, attn, amask, logp


def _sample(model, prompt_ids, prompt_mask, gen, generator, with_values, use_reference, greedy, prefix, keep_cache):
    S = 0  # columns the prefix cache has read already
    if prefix is not None:
        S = prefix.ids.shape[1]
        prompt_ids = torch.cat([prefix.ids, prompt_ids], 1)
        prompt_mask = torch.cat([prefix.mask, prompt_mask], 1)
    B, P = prompt_ids.shape
    T = gen.max_new_tokens
    device = prompt_ids.device
    stops = (
        torch.tensor(sorted(stop_ids(model.tokenizer, getattr(model.lm, "generation_config", None))), dtype=torch.long, device=device)
        if gen.stop_at_eos
        else None
    )
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    ids, attn, action_mask, logprobs = completion_buffers(prompt_ids, prompt_mask, T, model.tokenizer)
    values = torch.zeros((B, T), dtype=torch.float32, device=device) if with_values and model.value_head is not None else None
    alive = torch.ones(B, dtype=torch.bool, device=device)
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    # A head on the policy's trunk reads V(s_t) off the decode; a critic with a trunk of its
    # own scores the finished sequences in one pass of its own afterwards.
    own_values = getattr(model, "critic_kind", "head") == "head"

    ctx = model.reference() if use_reference else contextlib.nullcontext(model.lm)
    was_training = model.training
    model.eval()
    try:
        with ctx as lm:
            pos_all = position_ids_from_mask(attn[:, :P])
            # with a prefix, the first forward reads only the new columns, after its cache
            cur_ids, cur_pos = prompt_ids[:, S:], pos_all[:, S:]
            past = DynamicCache(ddp_cache_data=prefix.kv) if prefix is not None else None
            next_pos = pos_all[:, -1] + 1
            n_done = 0
            want_v = values is not None and own_values
            fast = decoder_for(model, lm) if gen.fast_decode and T > 1 else None
            if fast is not None:
                fast.refresh(adapters_on=not use_reference)
            # Rows that start from the same prompt (a group, best-of-n) share one prefill: the
            # distinct prompts are run once and their cache and first logits copied to each row.
            rows = _shared_rows(prompt_ids, prompt_mask) if gen.share_prefixes and prefix is None else None
            for t in range(T):
                if t == 0 and rows is not None:
                    first, inv = rows
                    logits, v, past = model.step_logits(lm, prompt_ids[first], attn[first, :P], pos_all[first], None, want_values=want_v)
                    logits, v = logits[inv], (v[inv] if v is not None else None)
                    if fast is not None:
                        past = fast.start(past, P + T, rows=inv)
                    elif T > 1 or keep_cache:  # every cache layer type (linear-attention states too) implements reorder_cache
                        past.reorder_cache(inv)
                elif fast is not None and t > 0:  # the one-token steps: folded weights, static cache
                    with model.autocast():
                        hidden = fast.step(cur_ids[:, 0], cur_pos[:, 0], attn[:, : P + t].bool(), past, P + t - 1)
                    logits = fast.logits(hidden)
                    v = model._value(hidden.float()) if want_v else None
                else:
                    logits, v, past = model.step_logits(lm, cur_ids, attn[:, : P + t], cur_pos, past, want_values=want_v)
                    if fast is not None:
                        past = fast.start(past, P + T)
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
                if want_v:
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
        keep = P + n_done
        if values is not None and not own_values and n_done:
            values[:, :n_done] = model.critic_values(ids[:, :keep], attn[:, :keep], n_done) * action_mask[:, :n_done]
        state = _turn_cache(past, ids, attn, keep - 1) if keep_cache else None
    finally:
        model.train(was_training)
    # trim columns no row used (keep = P + n_done)
    out = (
        ids[:, :keep],
        attn[:, :keep],
        action_mask[:, :n_done],
        logprobs[:, :n_done],
        values[:, :n_done] if values is not None else None,
        ended,
    )
    return out, state


def _shared_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(one row index per distinct prompt, each row's distinct prompt) when some rows repeat; else None."""
    if ids.shape[0] < 2:
        return None
    _, inv = torch.unique(torch.cat([ids, mask], 1), dim=0, return_inverse=True)
    n = int(inv.max()) + 1
    if n == ids.shape[0]:
        return None
    first = torch.full((n,), ids.shape[0], dtype=torch.long, device=ids.device)
    first.scatter_reduce_(0, inv, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
    return first, inv


def decode_completions(tokenizer, ids: torch.Tensor, action_mask: torch.Tensor, ended: torch.Tensor) -> list[str]:
    T = action_mask.shape[1]
    out = []
    for row, m, e in zip(ids[:, -T:].tolist(), action_mask.tolist(), ended.tolist()):
        n = int(sum(m))
        toks = row[: n - 1] if e and n > 0 else row[:n]  # drop the EOS token itself
        out.append(tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out


def has_chat_template(tokenizer, chat: bool = True) -> bool:
    return chat and bool(getattr(tokenizer, "chat_template", None))


def render_messages(tokenizer, messages: list[dict], *, chat: bool, system_prompt: str | None) -> str:
    """A conversation as the model sees it before its next turn: the chat template with the
    generation cue, or a plain transcript ending in 'Assistant:' without one."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + list(messages)
    if has_chat_template(tokenizer, chat):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    lines = [f"{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in msgs if m["role"] != "system"]
    system = "\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"])
    head = f"{system}\n\n" if system else ""
    return head + "\n".join(lines) + "\nAssistant:"


def glue_text(
    tokenizer, messages: list[dict], new_messages: list[dict], last_token: int | None, *, chat: bool, system_prompt: str | None
) -> str:
    """The text between the end of a sampled assistant turn and the next one: the end of the
    assistant's message (unless `last_token`, the turn's last sampled token, is the
    template's own end-of-turn token and so already closed it), `new_messages` (the user's
    reply, a tool's result, ...), and the cue for the assistant. `messages` is the
    conversation before the assistant's turn; `last_token` is None for a turn cut at the
    token limit, and a turn that stopped on another stop id keeps the template's marker."""
    if has_chat_template(tokenizer, chat):
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + list(messages)
        msgs += [{"role": "assistant", "content": _SENTINEL}, *new_messages]
        full = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        suffix = full[full.rindex(_SENTINEL) + len(_SENTINEL) :]
        head = suffix.lstrip()
        if last_token is not None and head:
            first = tokenizer(head, add_special_tokens=False)["input_ids"][:1]
            marker = tokenizer.decode([last_token])
            if first == [last_token] and marker and head.startswith(marker):
                # the sampled token is the template's end-of-turn marker: it closed the message
                suffix = head[len(marker) :]
        return suffix
    lines = "".join(f"\n{_ROLE_NAMES.get(m['role'], m['role'].title())}: {m['content']}" for m in new_messages)
    return lines + "\nAssistant:"


def check_context_length(model: PolicyValueModel, prompt_len: int, new: int, what: str) -> None:
    """One line, not a CUDA/index error, when a context would pass the model's positions."""
    limit = getattr(model.lm.config.get_text_config(), "max_position_embeddings", None)
    if limit and prompt_len + new > limit:
        raise UserError(
            f"{what} reaches {prompt_len + new} tokens, past the model's {limit} positions",
            "lower env.turns / env.max_turns, generation.max_new_tokens or the observations' length",
        )
