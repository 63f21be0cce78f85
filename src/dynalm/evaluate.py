"""Evaluation on the held-out split: each reward term, KL to the reference, perplexity
under the reference, distinct-1/2, mean length, EOS rate — for the trained policy and the
base model (the reference) side by side, sampled with the same seed."""

from __future__ import annotations

import math
import time

import torch

from .config import Config
from .envs import TextEnv
from .models.policy import PolicyValueModel
from .rewards import text as lex
from .rl.rollout import decode_completions, encode_prompts, sample


@torch.no_grad()
def evaluate_side(
    model: PolicyValueModel, env: TextEnv, rows: list[dict], cfg: Config, *, use_reference: bool
) -> dict:
    """Sample from the policy (or the reference) on `rows` and score the completions."""
    e = cfg.eval
    gen = torch.Generator(device=model.device).manual_seed(e.seed)
    rows = [r for r in rows for _ in range(e.samples_per_prompt)]
    prompts, completions, terms, scores = [], [], {}, []
    kl_sum, ref_nll, n_tok, lengths, ended = [], 0.0, 0.0, [], []
    t0 = time.perf_counter()
    for s in range(0, len(rows), e.batch_size):
        chunk = rows[s : s + e.batch_size]
        states = [env.reset(r) for r in chunk]
        p_ids, p_mask, _ = encode_prompts(model.tokenizer, states, cfg.model.max_prompt_tokens, model.device)
        ids, attn, amask, logp, _, end = sample(
            model, p_ids, p_mask, cfg.generation, generator=gen, with_values=False, use_reference=use_reference
        )
        comps = decode_completions(model.tokenizer, ids, amask, end)
        T = amask.shape[1]
        temp = cfg.generation.temperature
        ref_lp = model.reference_logprobs(ids, attn, T, temp)
        pol_lp = ref_lp if use_reference else logp
        kl_sum += ((pol_lp - ref_lp) * amask).sum(-1).tolist()
        ref_lp1 = ref_lp if temp == 1.0 else model.reference_logprobs(ids, attn, T, 1.0)
        ref_nll += float(-(ref_lp1 * amask).sum())
        n_tok += float(amask.sum())
        lengths += amask.sum(-1).tolist()
        ended += end.tolist()
        _, scored, _ = env.step(chunk, comps, end.tolist())
        for k, v in scored.terms.items():
            terms.setdefault(k, []).extend(v)
        scores += scored.scores
        prompts += [str(r[cfg.data.prompt_field]) for r in chunk]
        completions += comps
    secs = time.perf_counter() - t0
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "reward": mean(scores),
        "reward_std": float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0,
        **{f"reward/{k}": mean(v) for k, v in terms.items()},
        "kl": mean(kl_sum),
        "perplexity_ref": math.exp(ref_nll / max(n_tok, 1.0)),
        "distinct1": lex.distinct_n_corpus(completions, 1),
        "distinct2": lex.distinct_n_corpus(completions, 2),
        "mean_length": mean(lengths),
        "eos_rate": mean([float(x) for x in ended]),
        "n": len(completions),
        "seconds_per_sample": secs / max(len(completions), 1),
        "samples": [
            {"prompt": p, "completion": c, "reward": s} for p, c, s in zip(prompts, completions, scores)
        ],
    }


def evaluate(model: PolicyValueModel, rows: list[dict], cfg: Config, *, base: bool = True, trained: bool = True) -> dict:
    env = TextEnv(cfg, model.tokenizer)
    if cfg.eval.max_prompts:
        rows = rows[: cfg.eval.max_prompts]
    out: dict = {"n_prompts": len(rows)}
    if base:
        out["base"] = evaluate_side(model, env, rows, cfg, use_reference=True)
    if trained:
        out["trained"] = evaluate_side(model, env, rows, cfg, use_reference=False)
    if base and trained:
        out["delta_reward"] = out["trained"]["reward"] - out["base"]["reward"]
    return out


def summary_table(result: dict) -> str:
    """A markdown table of the scalar metrics, one column per side."""
    sides = [s for s in ("base", "trained") if s in result]
    keys = [k for k in result[sides[0]] if k != "samples"]
    lines = ["| metric | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    for k in keys:
        cells = []
        for s in sides:
            v = result[s].get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
