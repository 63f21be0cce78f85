"""Eval for multi-turn environments (dialog, custom): episodes on the held-out rows (or
seeds), run by the same rollout as training (rl/episodes.py), for the trained policy and
the base model side by side with the same seed.

Reported per side: mean return (the undiscounted sum of the turn rewards), each reward
term, the mean reward of turn k, turns per episode, success rate (episodes whose last
`info` says `success`), truncated share, KL to the reference, perplexity under the
reference, distinct-1/2 and self-BLEU of the assistant's turns; `samples` holds every
episode's transcript (`write_transcripts` puts a few in the run directory).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import torch

from .config import Config
from .errors import UserError
from .metrics import self_bleu
from .models.policy import PolicyValueModel
from .rewards import text as lex
from .rl.episodes import rollout


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


@torch.no_grad()
def evaluate_episodes_side(model: PolicyValueModel, env, rows: list[dict], cfg: Config, *, use_reference: bool) -> dict:
    """Episodes on `rows` with the policy (or the reference as the assistant), scored."""
    e = cfg.eval
    gen = torch.Generator(device=model.device).manual_seed(e.seed)
    rows = [r for r in rows for _ in range(e.samples_per_prompt)]
    temp = cfg.generation.temperature
    totals, terms, per_turn, kl, samples, turns, success, cut = [], defaultdict(list), defaultdict(list), [], [], [], [], []
    ref_nll, n_tok, replies, lengths, eos, extra = 0.0, 0.0, [], [], [], defaultdict(list)
    t0 = time.perf_counter()
    for s in range(0, len(rows), e.batch_size):
        chunk = rows[s : s + e.batch_size]
        batch, _, info = rollout(
            model, env, chunk, list(range(len(chunk))), cfg.generation, max_prompt_tokens=cfg.model.max_prompt_tokens,
            prompt_field=cfg.data.prompt_field, generator=gen, use_reference=use_reference, with_values=False,
        )
        m, T = batch.action_mask, batch.n_actions
        ref_lp = model.reference_logprobs(batch.input_ids, batch.attention_mask, T, temp)
        pol_lp = ref_lp if use_reference or model.is_reference else batch.logprobs
        kl += ((pol_lp - ref_lp) * m).sum(-1).tolist()
        ref_lp1 = ref_lp if temp == 1.0 else model.reference_logprobs(batch.input_ids, batch.attention_mask, T, 1.0)
        ref_nll += float(-(ref_lp1 * m).sum())
        n_tok += float(m.sum())
        totals += batch.scores.tolist()
        for k, v in batch.reward_terms.items():
            terms[k] += v.tolist()
        n_turns = []
        for i, tr in enumerate(batch.extras["transcript"]):
            a_turns = [t for t in tr if t["role"] == "assistant"]
            n_turns.append(len(a_turns))
            for k, t in enumerate(a_turns):
                per_turn[f"reward/turn_{k + 1}"].append(t["reward"])
            replies += [t["content"] for t in a_turns]
            last_info = a_turns[-1].get("info", {}) if a_turns else {}
            success.append(float(bool(last_info.get("success", False))))
            samples.append({
                "prompt": batch.prompts[i], "completion": batch.completions[i], "reward": float(batch.scores[i]),
                **{k: chunk[i].get(k) for k in ("persona", "goal", "seed") if k in chunk[i]}, "turns": tr,
            })
            ids = batch.turn_ids[i][m[i] > 0]
            lengths += [int(c) for c in torch.bincount(ids, minlength=len(a_turns)).tolist() if c]
        turns += n_turns
        eos.append((info["episode/turn_eos_rate"], sum(n_turns)))
        cut.append((info["episode/truncated"], len(chunk)))
        for k in ("dialog/user_words",):
            if k in info:
                extra[k.split("/")[-1]].append((info[k], len(chunk)))
    secs = time.perf_counter() - t0
    wmean = lambda pairs: sum(v * n for v, n in pairs) / max(sum(n for _, n in pairs), 1)  # noqa: E731
    return {
        "planner": "sample",
        "reward": _mean(totals),  # mean return: the total (undiscounted) turn reward per episode
        "reward_std": float(torch.tensor(totals).std()) if len(totals) > 1 else 0.0,
        **{f"reward/{k}": _mean(v) for k, v in terms.items()},  # each term: its per-episode total, averaged
        **{k: _mean(v) for k, v in sorted(per_turn.items(), key=lambda kv: int(kv[0].rsplit("_", 1)[1]))},
        "turns_per_episode": _mean(turns),
        "success_rate": _mean(success),
        "truncated_rate": wmean(cut),
        "kl": _mean(kl),
        "perplexity_ref": float(torch.exp(torch.tensor(ref_nll / max(n_tok, 1.0)))),
        "distinct1": lex.distinct_n_corpus(replies, 1),
        "distinct2": lex.distinct_n_corpus(replies, 2),
        "self_bleu": self_bleu(replies),
        "mean_length": _mean(lengths),  # assistant tokens per turn
        "eos_rate": wmean(eos),  # share of assistant turns that ended at a stop token
        **{k: wmean(v) for k, v in extra.items()},
        "n": len(totals),
        "turns": env.max_turns,
        "seconds_per_sample": secs / max(len(totals), 1),
        "samples": samples,
    }


def evaluate_episodes(
    model: PolicyValueModel, env, rows: list[dict], cfg: Config, *, base: bool = True, trained: bool = True,
    planner: str | None = None,
) -> dict:
    """evaluate.evaluate for multi-turn environments: base (the reference as the assistant) and/or trained."""
    name = planner or cfg.planner.name
    dialog = cfg.env.kind == "dialog"
    allowed = ("sample", "best-of-n") if dialog or hasattr(env, "fork") else ("sample",)
    allowed += ("lookahead",) if hasattr(env, "messages") else ()
    if name not in allowed:
        raise UserError(
            f"planner '{name}' is not available for env.kind {cfg.env.kind}", f"use planner {' or '.join(repr(a) for a in allowed)}"
        )
    out: dict = {"n_prompts": len(rows)}
    if name == "lookahead":  # candidates played inside a learned environment model; one real step per turn
        out["trained"] = _lookahead_side(model, env, rows, cfg)
        return out
    if name == "best-of-n":  # turn-level lookahead through the user simulator or forks of the env
        out["trained"] = _planned_dialog_side(model, env, rows, cfg) if dialog else _planned_side(model, env, rows, cfg)
        return out
    if base:
        out["base"] = evaluate_episodes_side(model, env, rows, cfg, use_reference=True)
    if trained:
        out["trained"] = evaluate_episodes_side(model, env, rows, cfg, use_reference=False)
    if base and trained:
        out["delta_reward"] = out["trained"]["reward"] - out["base"]["reward"]
    return out


def _planned_dialog_side(model: PolicyValueModel, env, rows: list[dict], cfg: Config) -> dict:
    from .planning.dialog import plan_dialog

    gen = torch.Generator(device=model.device).manual_seed(cfg.eval.seed)
    t0 = time.perf_counter()
    res = plan_dialog(model, env, rows, cfg.planner.n, generator=gen)
    secs = time.perf_counter() - t0
    replies = [t["content"] for tr in res.transcripts for t in tr if t["role"] == "assistant"]
    return {
        "planner": "best-of-n",
        "reward": sum(res.totals) / len(res.totals),
        "distinct1": lex.distinct_n_corpus(replies, 1),
        "distinct2": lex.distinct_n_corpus(replies, 2),
        "n": len(res.totals),
        "turns": cfg.env.turns,
        "reward_calls": res.reward_calls,
        "seconds_per_sample": secs / max(len(res.totals), 1),
        "samples": [
            {"prompt": str(r.get(cfg.data.prompt_field, "")), "completion": tr[-2]["content"] if len(tr) > 1 else "", "reward": tot, "turns": tr}
            for r, tr, tot in zip(rows, res.transcripts, res.totals)
        ],
    }


def _planned_side(model: PolicyValueModel, env, rows: list[dict], cfg: Config) -> dict:
    """Best-of-n per turn in a forkable environment (planning/episodes.py)."""
    from .planning.episodes import plan_episodes

    gen = torch.Generator(device=model.device).manual_seed(cfg.eval.seed)
    t0 = time.perf_counter()
    res = plan_episodes(model, env, rows, cfg.planner.n, cfg.generation, max_prompt_tokens=cfg.model.max_prompt_tokens, generator=gen)
    secs = time.perf_counter() - t0
    replies = [t["content"] for tr in res.transcripts for t in tr if t["role"] == "assistant"]
    return {
        "planner": "best-of-n",
        "reward": _mean(res.totals),
        "turns_per_episode": _mean(res.turns),
        "success_rate": _mean(float(x) for x in res.success),
        "truncated_rate": _mean(float(x) for x in res.truncated),
        "distinct1": lex.distinct_n_corpus(replies, 1),
        "distinct2": lex.distinct_n_corpus(replies, 2),
        "n": len(res.totals),
        "turns": env.max_turns,
        "env_steps": res.env_steps,
        "seconds_per_sample": secs / max(len(res.totals), 1),
        "samples": [
            {"prompt": tr[0]["content"] if tr else "", "completion": next((t["content"] for t in reversed(tr) if t["role"] == "assistant"), ""),
             "reward": tot, **({"seed": r["seed"]} if "seed" in r else {}), "turns": tr}
            for r, tr, tot in zip(rows, res.transcripts, res.totals)
        ],
    }


def _lookahead_side(model: PolicyValueModel, env, rows: list[dict], cfg: Config) -> dict:
    """Lookahead with a learned environment model (planning/lookahead.py)."""
    from .envs.model import ModelEnv
    from .planning.lookahead import plan_lookahead
    from .rewards import RewardSet

    if not cfg.planner.env_model:
        raise UserError("planner 'lookahead' imagines with a learned environment model: planner.env_model is not set",
                        "train one with `dynalm train-env-model` and pass --set planner.env_model=DIR")
    from .envmodel import load_env_model

    em, meta = load_env_model(cfg.planner.env_model, model.device)
    imagine = ModelEnv(cfg, model.tokenizer, RewardSet([]), model=em, openings=meta["openings"])
    gen = torch.Generator(device=model.device).manual_seed(cfg.eval.seed)
    t0 = time.perf_counter()
    res = plan_lookahead(model, env, imagine, rows, cfg, generator=gen)
    secs = time.perf_counter() - t0
    replies = [t["content"] for tr in res.transcripts for t in tr if t["role"] == "assistant"]
    return {
        "planner": "lookahead", "reward": _mean(res.totals), "turns_per_episode": _mean(res.turns),
        "success_rate": _mean(float(x) for x in res.success), "truncated_rate": _mean(float(x) for x in res.truncated),
        "distinct1": lex.distinct_n_corpus(replies, 1), "distinct2": lex.distinct_n_corpus(replies, 2),
        "n": len(res.totals), "turns": env.max_turns, "env_steps": res.env_steps, "imagined_steps": res.imagined_steps,
        "seconds_per_sample": secs / max(len(res.totals), 1),
        "samples": [
            {"prompt": tr[0]["content"] if tr else "", "completion": next((t["content"] for t in reversed(tr) if t["role"] == "assistant"), ""),
             "reward": tot, "imagined_returns": g, **({"seed": r["seed"]} if "seed" in r else {}), "turns": tr}
            for r, tr, tot, g in zip(rows, res.transcripts, res.totals, res.imagined_returns)
        ],
    }


def write_transcripts(path, result: dict, n: int) -> int:
    """The first `n` eval episodes of each side as JSON lines; returns the count written."""
    from .checkpoint import write_text_atomic

    lines = []
    for side in ("base", "trained", "model"):
        for i, s in enumerate(result.get(side, {}).get("samples", [])[:n]):
            rec = {"side": side, "episode": i, **{k: s.get(k) for k in ("persona", "goal", "seed") if k in s},
                   "reward": s["reward"], "turns": s["turns"]}
            lines.append(json.dumps(rec, ensure_ascii=False))
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    return len(lines)
