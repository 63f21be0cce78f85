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
from .envs import make_env
from .models.policy import PolicyValueModel
from .rl.episodes import rollout


@torch.no_grad()
def token_batch(model: PolicyValueModel, rows: list[dict], cfg: Config, seed: int = 0, beta: float | None = None):
    """A training batch for `rows`, scored, with the per-token rewards and advantages the
    update would use: each row rolled out `algorithm.num_generations` times as one group,
    then the trainer's own `shape_batch` (add_token_rewards, add_advantages) with β = `beta` (the
    run's adapted β; default: the model's `trained_beta`, else kl.coef) — group baselines, whitening and all."""
    from .rl.objectives import shape_batch

    if beta is None:
        beta = model.trained_beta if model.trained_beta is not None else cfg.kl.coef
    n = cfg.algorithm.num_generations
    rows = [r for r in rows for _ in range(n)]
    group = [i // n for i in range(len(rows))]
    gen = torch.Generator(device=model.device).manual_seed(seed)
    env = make_env(cfg, model)
    batch, _, _ = rollout(model, env, rows, group, cfg.generation, max_prompt_tokens=cfg.model.max_prompt_tokens,
                          prompt_field=cfg.data.prompt_field, generator=gen)
    T = batch.n_actions
    batch.ref_logprobs = model.reference_logprobs(batch.input_ids, batch.attention_mask, T, cfg.generation.temperature)
    shape_batch(batch, cfg, beta)
    return batch


def token_table(model: PolicyValueModel, rows: list[dict], cfg: Config, seed: int = 0, beta: float | None = None) -> list[dict]:
    """Per sample: prompt, tokens, and per-token advantage, KL and reward, exactly as the
    update computes them (see `token_batch`). A dialog shows every token after the first
    prompt, the user's with zero advantage and reward."""
    batch = token_batch(model, rows, cfg, seed, beta)
    m, T = batch.action_mask, batch.n_actions
    kl = (batch.logprobs - batch.ref_logprobs) * m
    lengths = (batch.attention_mask[:, -T:] if batch.turn_ids is not None else m).sum(-1).long().tolist()
    return table_rows(model.tokenizer, batch, batch.advantages, kl, lengths)


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
