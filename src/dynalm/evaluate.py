"""Evaluation on the held-out split: each reward term, KL to the reference, perplexity
under the reference, distinct-1/2, mean length, EOS rate — for the trained policy and the
base model (the reference) side by side, sampled with the same seed."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable

import torch

from .config import Config, EvalConfig
from .data import prompt_text
from .envs import TextEnv
from .models.policy import PolicyValueModel
from .metrics import self_bleu
from .rewards import text as lex
from .models.generation import assemble_completions, decode_completions, encode_prompts, sample


def limit_rows(rows: list[dict], e: EvalConfig) -> list[dict]:
    """The eval prompts an eval uses: the first `eval.max_prompts` (all when null)."""
    return rows[: e.max_prompts] if e.max_prompts else rows


@torch.no_grad()
def evaluate_side(
    model: PolicyValueModel, env: TextEnv, rows: list[dict], cfg: Config, *, use_reference: bool, planner: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Decode on `rows` with the policy (or the reference) and score the completions.

    `planner` (default cfg.planner.name) picks the decoder: plain sampling, greedy,
    best-of-n or mcts (see dynalm.planning); planners other than sampling need the policy.
    `progress(k)` is told each time k more completions are decoded.
    """
    from .planning import plan, path_reward_for

    progress = progress or (lambda k: None)

    e = cfg.eval
    pcfg = cfg.planner.model_copy(update={"name": planner or cfg.planner.name})
    gen = torch.Generator(device=model.device).manual_seed(e.seed)
    mcts_rng = random.Random(pcfg.seed)  # one stream over all chunks: the result does not depend on eval.batch_size
    rows = [r for r in rows for _ in range(e.samples_per_prompt)]
    prompts, completions, terms, scores = [], [], {}, []
    kl_sum, ref_nll, n_tok, lengths, ended, passes = [], 0.0, 0.0, [], [], 0
    temp = cfg.generation.temperature
    t0 = time.perf_counter()
    for s in range(0, len(rows), e.batch_size):
        chunk = rows[s : s + e.batch_size]
        states = [env.reset(r) for r in chunk]
        p_ids, p_mask, _ = encode_prompts(model.tokenizer, states, cfg.model.max_prompt_tokens, model.device)
        if pcfg.name == "sample":
            ids, attn, amask, logp, _, end = sample(
                model, p_ids, p_mask, cfg.generation, generator=gen, with_values=False, use_reference=use_reference
            )
            comps = decode_completions(model.tokenizer, ids, amask, end)
            end = end.tolist()
            passes += amask.shape[1]
            progress(len(chunk))
        else:
            res = plan(model, env, chunk, cfg.generation, pcfg, max_prompt_tokens=cfg.model.max_prompt_tokens, generator=gen,
                       on_done=progress, rng=mcts_rng, path_reward=path_reward_for(cfg, model))
            comps, end, passes = res.completions, res.ended, passes + res.forward_passes
            T = max(1, max(len(t) for t in res.token_ids))
            ids, attn, amask, _ = assemble_completions(p_ids, p_mask, res.token_ids, T, model.tokenizer)
            logp = model(ids, attn, amask.shape[1], temperature=temp, entropy=False).logprobs
        T = amask.shape[1]
        ref_lp = model.reference_logprobs(ids, attn, T, temp)
        pol_lp = ref_lp if use_reference or model.is_reference else logp
        kl_sum += ((pol_lp - ref_lp) * amask).sum(-1).tolist()
        ref_lp1 = ref_lp if temp == 1.0 else model.reference_logprobs(ids, attn, T, 1.0)
        ref_nll += float(-(ref_lp1 * amask).sum())
        n_tok += float(amask.sum())
        lengths += amask.sum(-1).tolist()
        ended += list(end)
        _, scored, _ = env.step(chunk, comps, list(end))
        for k, v in scored.terms.items():
            terms.setdefault(k, []).extend(v)
        scores += scored.scores
        prompts += [prompt_text(r, cfg.data.prompt_field) for r in chunk]
        completions += comps
    secs = time.perf_counter() - t0
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {
        "planner": pcfg.name,
        "reward": mean(scores),
        "reward_std": float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0,
        **{f"reward/{k}": mean(v) for k, v in terms.items()},
        "kl": mean(kl_sum),
        "perplexity_ref": math.exp(ref_nll / max(n_tok, 1.0)),
        "distinct1": lex.distinct_n_corpus(completions, 1),
        "distinct2": lex.distinct_n_corpus(completions, 2),
        "self_bleu": self_bleu(completions),
        "mean_length": mean(lengths),
        "eos_rate": mean([float(x) for x in ended]),
        "n": len(completions),
        "seconds_per_sample": secs / max(len(completions), 1),
        "forward_calls": passes,
        "samples": [
            {"prompt": p, "completion": c, "reward": s} for p, c, s in zip(prompts, completions, scores)
        ],
    }


def evaluate(
    model: PolicyValueModel, rows: list[dict], cfg: Config, *, base: bool = True, trained: bool = True, planner: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Base (the reference, plain sampling) and/or trained policy (with `planner`) on `rows`.
    `progress(k)`: k more completions decoded (text tasks; a dialog eval does not report)."""
    if cfg.env.kind != "text":  # multi-turn episodes (dialog, custom): evaluate_episodes.py
        from .envs import make_env
        from .evaluate_episodes import evaluate_episodes

        return evaluate_episodes(model, make_env(cfg, model), limit_rows(rows, cfg.eval), cfg, base=base, trained=trained, planner=planner)
    env = TextEnv(cfg, model.tokenizer)
    rows = limit_rows(rows, cfg.eval)
    out: dict = {"n_prompts": len(rows)}
    if base:
        out["base"] = evaluate_side(model, env, rows, cfg, use_reference=True, planner="sample", progress=progress)
    if trained:
        out["trained"] = evaluate_side(model, env, rows, cfg, use_reference=False, planner=planner, progress=progress)
    if base and trained:
        out["delta_reward"] = out["trained"]["reward"] - out["base"]["reward"]
    return out


def summary_rows(result: dict) -> tuple[list[str], list[list]]:
    """The scalar metrics of an eval result: columns (metric, then one per side) and rows."""
    sides = [s for s in ("base", "trained", "model") if s in result]
    keys = [k for k in result[sides[0]] if k not in ("samples", "planner")]
    return ["metric", *sides], [[k, *(result[s].get(k) for s in sides)] for k in keys]


def summary_table(result: dict) -> str:
    """A markdown table of the scalar metrics, one column per side."""
    cols, rows = summary_rows(result)
    lines = ["| " + " | ".join(cols) + " |", "|---|" + "---|" * (len(cols) - 1)]
    for k, *vals in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
