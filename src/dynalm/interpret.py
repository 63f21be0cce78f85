"""Per-token views of what the policy learned (article section 7: interpretability).

For a few eval prompts, sample a completion from the trained policy and colour each token by
its advantage, its KL contribution log π − log π_ref, and its per-token reward — the same
quantities the trainer computes — as an HTML page next to report.md.
"""

from __future__ import annotations

import html
from pathlib import Path

import torch

from .config import Config
from .envs import TextEnv
from .models.policy import PolicyValueModel
from .rl import advantages as adv_mod
from .rl.rollout import decode_completions, encode_prompts, sample


@torch.no_grad()
def token_table(model: PolicyValueModel, rows: list[dict], cfg: Config, seed: int = 0) -> list[dict]:
    """Per sample: prompt, tokens, and per-token advantage, KL and reward."""
    if cfg.env.kind == "dialog":  # whole conversations: envs/dialog.py
        from .envs.dialog import dialog_token_table

        return dialog_token_table(model, rows, cfg, seed)
    from .rl.batch import Batch
    from .rl.trainer import add_advantages, add_token_rewards

    env = TextEnv(cfg, model.tokenizer)
    states = [env.reset(r) for r in rows]
    p_ids, p_mask, _ = encode_prompts(model.tokenizer, states, cfg.model.max_prompt_tokens, model.device)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    ids, attn, amask, logp, values, ended = sample(model, p_ids, p_mask, cfg.generation, generator=gen)
    comps = decode_completions(model.tokenizer, ids, amask, ended)
    _, scored, _ = env.step(rows, comps, ended.tolist())
    T = amask.shape[1]
    batch = Batch(
        input_ids=ids, attention_mask=attn, action_mask=amask, logprobs=logp, values=values,
        prompts=[str(r[cfg.data.prompt_field]) for r in rows], completions=comps,
        group=torch.arange(len(rows)), ended=ended,
    )
    batch.ref_logprobs = model.reference_logprobs(ids, attn, T, cfg.generation.temperature)
    batch.scores = torch.tensor(scored.scores, dtype=torch.float32, device=amask.device)
    beta = cfg.kl.coef
    add_token_rewards(batch, cfg, beta)
    if values is not None and cfg.algorithm.needs_value_head:
        a = cfg.algorithm
        if a.advantage_kind == "td":
            adv, _ = adv_mod.td0(batch.rewards, values, amask, a.gamma)
        else:
            adv, _ = adv_mod.gae(batch.rewards, values, amask, a.gamma, a.lam)
    else:  # critic-free: every token of a completion shares its return, relative to the others
        ret = batch.rewards.sum(-1)
        adv = (ret - ret.mean())[:, None] * amask
    kl = (logp - batch.ref_logprobs) * amask
    return table_rows(model.tokenizer, batch, adv, kl, amask.sum(-1).long().tolist())


def table_rows(tokenizer, batch, adv: torch.Tensor, kl: torch.Tensor, lengths: list[int]) -> list[dict]:
    """One entry per row: its first `lengths[i]` generated tokens with their advantage, KL and reward."""
    T = batch.n_actions
    out = []
    for i, n in enumerate(lengths):
        toks = batch.input_ids[i, -T:][:n].tolist()
        out.append(
            {
                "prompt": batch.prompts[i],
                "tokens": [tokenizer.decode([t]) for t in toks],
                "advantage": adv[i, :n].tolist(),
                "kl": kl[i, :n].tolist(),
                "reward": batch.rewards[i, :n].tolist(),
                "score": float(batch.scores[i]),
            }
        )
    return out


def _colour(v: float, scale: float) -> str:
    x = max(-1.0, min(1.0, v / scale)) if scale > 0 else 0.0
    if x >= 0:
        return f"rgba(0,160,60,{0.85 * x:.2f})"
    return f"rgba(210,40,40,{-0.85 * x:.2f})"


def write_token_html(samples: list[dict], out: Path) -> Path:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>dynalm: per-token view</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}"
        ".tok{padding:1px 0;border-radius:3px;white-space:pre-wrap}.row{margin:.3em 0 .8em}"
        "h3{margin-bottom:.2em}.lab{font-size:.8em;color:#555}</style>",
        "<h1>Per-token view of eval samples</h1>",
        "<p>Green is positive, red negative; the colour scale is per row (its largest |value|). "
        "Hover a token for its value. <b>advantage</b>: the trainer's advantage estimate; "
        "<b>KL</b>: log π − log π_ref; <b>reward</b>: per-token reward (KL penalty, environment-LM term, "
        "and the sequence score on the last token).</p>",
    ]
    for s in samples:
        parts.append(f"<h3>{html.escape(s['prompt'])}</h3><div class='lab'>score {s['score']:.3f}</div>")
        for key in ("advantage", "kl", "reward"):
            vals = s[key]
            scale = max((abs(v) for v in vals), default=0.0)
            spans = "".join(
                f"<span class='tok' style='background:{_colour(v, scale)}' title='{key} {v:.4f}'>{html.escape(t)}</span>"
                for t, v in zip(s["tokens"], vals)
            )
            parts.append(f"<div class='lab'>{key}</div><div class='row'>{spans}</div>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
