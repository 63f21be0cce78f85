"""One rollout for every environment: episodes of assistant turns into one Batch.

Each turn the policy samples the next assistant turn of every live episode in one batch;
the environment (envs/base.py's `EpisodeEnv`) answers all of them at once. The training
sequence of an episode (rl/batch.py's layout) is

    [left-padded first prompt | assistant turn 1 | observation 2 + template | assistant turn 2 | ...]

built from token ids, never re-tokenised, so the log-probs and values recorded while
sampling equal those of one forward over the whole sequence. With `generation.turn_cache`
each turn after the first prefills only its new tokens, after the KV cache the episode's
earlier turns left (`sample_turn`). Only assistant tokens are
actions (action_mask 1): observation and template tokens are context, outside every loss,
KL, fluency term and metric. Each turn's reward sits on that turn's last token; credit
flows across turns through the value head (GAE/TD skip the masked gaps) with
`env.turn_gamma` between turns (rl/advantages.py). An episode still running after
`env.max_turns` turns is cut there and counted as truncated.

A single-turn environment (`env.single_turn`, the text env) gives exactly the batch of plain sampling: no
turn ids, the score on the last token.
"""

from __future__ import annotations

import time

import torch

from ..envs.base import format_transcript
from ..models.generation import check_context_length, decode_completions, encode_prompts, left_pad, sample, sample_turn
from ..models.policy import PolicyValueModel
from .batch import Batch


def _extras(rows: list[dict], prompt_field: str) -> dict:
    keys = sorted({k for r in rows for k in r if k != prompt_field})
    return {k: [r.get(k) for r in rows] for k in keys}


@torch.no_grad()
def rollout(
    model: PolicyValueModel,
    env,
    rows: list[dict],
    group: list[int],
    gen,
    *,
    max_prompt_tokens: int,
    prompt_field: str = "prompt",
    generator: torch.Generator | None = None,
    training: bool = False,
    use_reference: bool = False,
    with_values: bool = True,
    score: bool = True,
    engine=None,
) -> tuple[Batch, int, dict]:
    """Episodes for `rows` (one each); returns (batch, n_truncated_prompts, metrics).

    `use_reference` samples from the reference policy (eval's base side); `score=False`
    leaves a single-turn batch unscored (Dyna scores it itself); `engine` (a
    models.vllm_engine.VLLMEngine) samples a single-turn batch in the policy's place.
    """
    tok, dev = model.tokenizer, model.device
    t_env = 0.0
    rendered, prompts = env.begin(rows, training=training)
    p_ids, p_mask, truncated = encode_prompts(tok, rendered, max_prompt_tokens, dev)
    B, P = p_ids.shape
    grp = torch.tensor(group, dtype=torch.long, device=dev)
    if getattr(env, "single_turn", False):
        if engine is not None and not use_reference:
            ids, attn, amask, logp, values, ended = engine.sample(p_ids, p_mask, gen, generator)
        else:
            ids, attn, amask, logp, values, ended = sample(
                model, p_ids, p_mask, gen, generator=generator, with_values=with_values, use_reference=use_reference
            )
        replies = decode_completions(tok, ids, amask, ended)
        batch = Batch(ids, attn, amask, logp, values, prompts, replies, grp, ended, extras=_extras(rows, prompt_field))
        t0 = time.perf_counter()
        last = _last_tokens(ids[:, P:], amask, ended)
        turn = env.advance(list(range(B)), replies, last, ended.tolist(), training=training, generator=generator, score=score)
        t_env += time.perf_counter() - t0
        if score:
            batch.scores = torch.tensor(turn.rewards, dtype=torch.float32, device=dev)
            batch.reward_terms = {k: torch.tensor(v, dtype=torch.float32) for k, v in turn.terms.items()}
        info = {"time/env": t_env, **env.episode_info()}
        return batch, truncated, info

    ctx = [p_ids[i, p_mask[i].bool()].tolist() for i in range(B)]  # each episode's tokens so far
    region = [[] for _ in range(B)]  # tokens after the first prompt
    act, lps, vals, tids = ([[] for _ in range(B)] for _ in range(4))
    ends: list[list[int]] = [[] for _ in range(B)]  # region index of each turn's last token
    turn_rewards: list[list[float]] = [[] for _ in range(B)]
    turn_terms: list[list[dict]] = [[] for _ in range(B)]
    turn_eos: list[list[bool]] = [[] for _ in range(B)]  # per episode: each turn stopped at a stop token
    done, cut = [False] * B, [False] * B
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    cache, row_of = None, {}  # the previous turn's TurnCache, and each live episode's row in it
    pending: list[list[int]] = [[] for _ in range(B)]  # per episode: tokens the cache has not read
    for k in range(env.max_turns):
        live = [i for i in range(B) if not done[i]]
        if not live:
            break
        check_context_length(model, max(len(ctx[i]) for i in live), gen.max_new_tokens, f"assistant turn {k + 1}'s context")
        # after the first turn only the unread tokens are new; a row with none (an empty
        # observation after a turn that stopped early) has no logits to start from: re-prefill
        prefix = cache.select([row_of[i] for i in live]) if cache is not None and all(pending[i] for i in live) else None
        new = [pending[i] for i in live] if prefix is not None else [ctx[i] for i in live]
        ids, mask = left_pad(new, pad)
        (out, omask, amask, logp, values, ended), cache = sample_turn(
            model, ids.to(dev), mask.to(dev), gen, prefix, generator=generator, with_values=with_values,
            use_reference=use_reference,
        )
        if not gen.turn_cache:
            cache = None
        width = out.shape[1] - amask.shape[1]
        row_of = {i: j for j, i in enumerate(live)}
        unread = cache.pending(out, omask) if cache is not None else [[] for _ in live]
        replies = decode_completions(tok, out, amask, ended)
        n_tok = amask.sum(-1).long().tolist()
        for j, i in enumerate(live):
            toks = out[j, width : width + n_tok[j]].tolist()
            region[i] += toks
            ctx[i] += toks
            act[i] += [1.0] * len(toks)
            lps[i] += logp[j, : len(toks)].tolist()
            vals[i] += values[j, : len(toks)].tolist() if values is not None else [0.0] * len(toks)
            tids[i] += [k] * len(toks)
            ends[i].append(len(region[i]) - 1)
        for j, i in enumerate(live):
            turn_eos[i].append(bool(ended[j]))
        t0 = time.perf_counter()
        last = _last_tokens(out[:, width:], amask, ended)
        turn = env.advance(live, replies, last, ended.tolist(), training=training, generator=generator)
        t_env += time.perf_counter() - t0
        for j, i in enumerate(live):
            turn_rewards[i].append(turn.rewards[j])
            turn_terms[i].append({n: v[j] for n, v in turn.terms.items()})
            if turn.done[j]:
                done[i] = True
                cut[i] = bool(turn.truncated[j]) if turn.truncated else False
            elif k == env.max_turns - 1:  # still running after the last allowed turn: cut here
                done[i] = cut[i] = True
            else:  # the observation (and template) before the next assistant turn: context, not actions
                glue = tok(turn.glue[j], add_special_tokens=False)["input_ids"]
                pending[i] = unread[j] + glue
                region[i] += glue
                ctx[i] += glue
                act[i] += [0.0] * len(glue)
                lps[i] += [0.0] * len(glue)
                vals[i] += [0.0] * len(glue)
                tids[i] += [-1] * len(glue)

    T = max(1, max(len(r) for r in region))
    input_ids = torch.full((B, P + T), pad, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    input_ids[:, :P], attn[:, :P] = p_ids.cpu(), p_mask.cpu()
    action_mask, logprobs, value_t, scores_t = (torch.zeros((B, T)) for _ in range(4))
    turn_ids = torch.full((B, T), -1, dtype=torch.long)
    for i in range(B):
        n = len(region[i])
        input_ids[i, P : P + n] = torch.tensor(region[i], dtype=torch.long)
        attn[i, P : P + n] = 1
        action_mask[i, :n] = torch.tensor(act[i])
        logprobs[i, :n] = torch.tensor(lps[i])
        value_t[i, :n] = torch.tensor(vals[i])
        turn_ids[i, :n] = torch.tensor(tids[i], dtype=torch.long)
        for pos, r in zip(ends[i], turn_rewards[i]):
            scores_t[i, pos] += r
    transcripts = env.transcripts()
    batch = Batch(
        input_ids=input_ids.to(dev),
        attention_mask=attn.to(dev),
        action_mask=action_mask.to(dev),
        logprobs=logprobs.to(dev),
        values=value_t.to(dev) if with_values and model.value_head is not None else None,
        prompts=prompts,
        completions=[format_transcript(t) for t in transcripts],
        group=grp,
        ended=torch.tensor([all(e) and not c for e, c in zip(turn_eos, cut)], device=dev),  # every turn stopped by itself
        extras={**_extras(rows, prompt_field), "transcript": transcripts},
        turn_ids=turn_ids.to(dev),
        turn_scores=scores_t.to(dev),
    )
    # Episode totals (undiscounted): the score is the sum of the turn scores, each term the sum of its values.
    batch.scores = torch.tensor([sum(r) for r in turn_rewards], dtype=torch.float32, device=dev)
    names = sorted({n for ts in turn_terms for t in ts for n in t})
    batch.reward_terms = {
        n: torch.tensor([sum(t.get(n, 0.0) for t in ts) for ts in turn_terms], dtype=torch.float32) for n in names
    }
    n_turns = [len(r) for r in turn_rewards]
    K = max(n_turns)
    info = {
        **{f"reward/turn_{k + 1}": _mean([r[k] for r in turn_rewards if len(r) > k]) for k in range(K)},
        "episode/turns": sum(n_turns) / B,
        "episode/truncated": sum(cut) / B,
        "episode/turn_eos_rate": sum(map(sum, turn_eos)) / max(sum(n_turns), 1),
        "episode/assistant_tokens_per_turn": float(action_mask.sum()) / max(sum(n_turns), 1),
        "time/env": t_env,
        **env.episode_info(),
    }
    return batch, truncated, info


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _last_tokens(out: torch.Tensor, amask: torch.Tensor, ended: torch.Tensor) -> list[int | None]:
    """The stop token each row ended on (None for a row cut at the token limit)."""
    n = amask.sum(-1).long().tolist()
    return [int(out[j, n[j] - 1]) if bool(ended[j]) and n[j] else None for j in range(len(n))]
