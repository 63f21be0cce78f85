"""`dynalm rollouts`: rated completions of a policy on its training prompts, as JSONL rows
that `dynalm train-rm` reads ({prompt, completion, reward}).

This is the first step of a critic started from a reward model (OpenRLHF, PPO-MCTS): roll
out the policy, score the completions with the task's own reward, train a reward model on
them and on their prefixes (`train-rm --set prefixes=K`: the Monte-Carlo value of each
state), then `dynalm train --set model.critic=model --set model.critic_init=RM`. Each row's
`prompt` is the task template already applied, so that a reward model trained with
train-rm's default template reads exactly the state the policy and its critic read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import write_text_atomic
from .config import Config
from .data import is_messages, render_template
from .errors import UserError
from .models.generation import decode_completions, encode_prompts, sample
from .models.policy import PolicyValueModel


def check_out(out: Path, force: bool) -> None:
    """Refuse before any model loads: a folder, or a file already there without --force."""
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder", "give a file name, e.g. rollouts.jsonl")
    if out.exists() and not force:
        raise UserError(f"'{out}' already exists", "pass --force to replace it, or choose another --out")


def check_counts(*counts: int) -> None:
    if any(n < 1 for n in counts):
        raise UserError("--per-prompt and --batch must be at least 1", "pass 1 or more")


def rated_rows(cfg: Config, rows: list[dict]) -> list[str]:
    """Each row's prompt as train-rm's rows carry it (the task template applied), checked to
    render as the policy's own state; the reason it cannot, as a UserError."""
    d, m = cfg.data, cfg.model
    if cfg.env.kind != "text":
        raise UserError(
            f"rollouts writes single-turn rated completions, and env.kind={cfg.env.kind} is multi-turn",
            "record its transitions with env.record_transitions: true and use `dynalm train-env-model`",
        )
    if any(is_messages(r[d.prompt_field]) for r in rows):
        raise UserError("rollouts needs text prompts, and the data holds conversations", "give rows whose prompt is a string")
    if m.system_prompt is not None or not m.use_chat_template:
        raise UserError(
            "a reward model would read these prompts differently from the policy (model.system_prompt or use_chat_template=false)",
            "unset model.system_prompt and keep model.use_chat_template: true",
        )
    return [render_template(d.template, r, d.prompt_field) for r in rows]


@torch.no_grad()
def write_rollouts(
    cfg: Config, model: PolicyValueModel, rows: list[dict], out: Path, *, per_prompt: int, batch: int, seed: int,
    echo: Callable[[str], None] = lambda s: None,
) -> dict:
    """Sample `per_prompt` completions of every row, score them with the config's reward and
    write {prompt, completion, reward} lines to `out` (atomically: a failure leaves what was
    there). Returns {rows, reward_mean, reward_std}."""
    from .envs import TextEnv

    check_counts(per_prompt, batch)
    texts = rated_rows(cfg, rows)
    env = TextEnv(cfg, model.tokenizer)
    tok = model.tokenizer
    model.eval()
    todo = [(r, t) for r, t in zip(rows, texts) for _ in range(per_prompt)]
    gen = torch.Generator(device=model.device).manual_seed(seed)
    lines: list[str] = []
    rewards: list[float] = []
    for s in range(0, len(todo), batch):
        chunk = todo[s : s + batch]
        states = [env.reset(r) for r, _ in chunk]
        p_ids, p_mask, _ = encode_prompts(tok, states, cfg.model.max_prompt_tokens, model.device)
        ids, _, amask, _, _, ended = sample(model, p_ids, p_mask, cfg.generation, generator=gen, with_values=False)
        comps = decode_completions(tok, ids, amask, ended)
        _, scored, _ = env.step([r for r, _ in chunk], comps, ended.tolist())
        for (_, text), c, x in zip(chunk, comps, scored.scores):
            rewards.append(float(x))
            lines.append(json.dumps({"prompt": text, "completion": c, "reward": float(x)}, ensure_ascii=False) + "\n")
        echo(f"{s + len(chunk)}/{len(todo)} rollouts")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, "".join(lines))
    n = len(rewards)
    mean = sum(rewards) / n if n else float("nan")
    std = (sum((x - mean) ** 2 for x in rewards) / n) ** 0.5 if n else float("nan")
    return {"rows": n, "reward_mean": mean, "reward_std": std}
