"""Recorded transitions as an environment model's training data, and the text it reads and writes.

A transition (transitions.py) is the article's (s, a, s', r) for text: `state` (the
conversation before the assistant's turn), `action` (that turn), `next_observation` (the
messages the environment answered with, or null at a natural end), `reward`,
`terminated`, `truncated`. The environment model sees the conversation *from the
environment's side*: its system message (`instruction`) tells it that it plays the other
party, and the roles are swapped, so the agent's turns are the "user" of its chat and the
environment's messages are its own "assistant" turns. That is how the prompted user
simulator of envs/dialog.py is asked too, so the same base model, prompted, is the
baseline the trained model is measured against.

An observation is one text for the model: a single user message is its content; any other
observation (a tool's result, several messages) is one line per message, `[role] content`
(`observation_text`), read back by `parse_observation` for the roles in ENV_ROLES only.
"""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

from ..data import jsonl_objects, read_text
from ..errors import UserError

REQUIRED = ("episode", "state", "action", "next_observation", "reward", "terminated")
# the roles an environment speaks in (never "assistant": that is the agent); any other
# bracketed word at a line start ("[sighs] fine") is text
ENV_ROLES = ("user", "tool", "system", "ipython", "environment")
_TAG = re.compile(r"^\[(" + "|".join(ENV_ROLES) + r")\] ?", re.M)


def observation_text(msgs: list[dict]) -> str:
    """An observation (chat messages) as the one text the model writes."""
    if len(msgs) == 1 and msgs[0]["role"] == "user":
        return msgs[0]["content"]
    return "\n".join(f"[{m['role']}] {m['content']}" for m in msgs)


def parse_observation(text: str) -> list[dict]:
    """`observation_text` read back: `[role] …` lines start messages; untagged text is the user's."""
    marks = list(_TAG.finditer(text))
    if not marks:
        return [{"role": "user", "content": text.strip()}]
    out = []
    head = text[: marks[0].start()].strip()
    if head:
        out.append({"role": "user", "content": head})
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        out.append({"role": m.group(1), "content": text[m.end() : end].strip()})
    return out


def environment_view(state: list[dict], action: str) -> list[dict]:
    """The conversation as the environment sees it: the agent's turns as "user" messages, the
    environment's own (user, tool, …) as "assistant" ones; consecutive environment messages
    are one turn, in the observation's own text form."""
    out: list[dict] = []
    pending: list[dict] = []

    def flush():
        if pending:
            out.append({"role": "assistant", "content": observation_text(pending)})
            pending.clear()

    for m in list(state) + [{"role": "assistant", "content": action}]:
        if m["role"] == "assistant":
            flush()
            out.append({"role": "user", "content": m["content"]})
        elif m["role"] != "system":
            pending.append(m)
    flush()
    return out


def _check(spec: str, line: int, row: dict) -> None:
    for f in REQUIRED:
        if f not in row:
            raise UserError(f"{spec}: line {line} has no field '{f}'", "give transitions.jsonl written with env.record_transitions: true")
    msgs_ok = lambda v: isinstance(v, list) and all(  # noqa: E731
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v
    )
    if not msgs_ok(row["state"]) or not row["state"]:
        raise UserError(f"{spec}: line {line}: 'state' must be a non-empty list of chat messages", "fix that line")
    if not isinstance(row["action"], str):
        raise UserError(f"{spec}: line {line}: 'action' must be a string", "fix that line")
    obs = row["next_observation"]
    if obs is not None and (not msgs_ok(obs) or not obs):
        raise UserError(f"{spec}: line {line}: 'next_observation' must be chat messages or null", "fix that line")
    r = row["reward"]
    if not (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r)):
        raise UserError(f"{spec}: line {line}: 'reward' must be a finite number, not {r!r}", "fix that line")


def read_transitions(spec: str) -> list[dict]:
    """The real rows of a transitions.jsonl (every line checked), in file order; rows an
    environment model imagined (`info.imagined`, envs/model.py) are left out."""
    path = Path(spec)
    if path.is_dir() and (path / "transitions.jsonl").is_file():
        path = path / "transitions.jsonl"  # a run directory
    if not path.is_file():
        raise UserError(f"transitions file '{spec}' not found", "record one with --set env.record_transitions=true, or check the path")
    rows, imagined = [], 0
    for i, row in jsonl_objects(spec, read_text(spec, path)):
        _check(spec, i, row)
        if isinstance(row.get("info"), dict) and row["info"].get("imagined"):
            imagined += 1  # played inside an environment model, not the environment: not data about it
            continue
        rows.append(row)
    if not rows:
        what = f"holds only imagined transitions ({imagined})" if imagined else "is empty"
        raise UserError(f"transitions file '{spec}' {what}", "train or evaluate with env.record_transitions: true first")
    return rows


def split_by_episode(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held_out): whole episodes held out (a seeded shuffle of the episode ids), so no
    turn of a held-out conversation is seen in training."""
    eps = sorted({str(r["episode"]) for r in rows})
    random.Random(seed).shuffle(eps)
    n = 0 if eval_fraction <= 0 else max(1, round(len(eps) * eval_fraction))
    held = set(eps[:n])
    return [r for r in rows if str(r["episode"]) not in held], [r for r in rows if str(r["episode"]) in held]


def openings(rows: list[dict], limit: int = 256) -> list[list[dict]]:
    """Distinct first states (the environment's reset observations), in order of first sight."""
    seen, out = set(), []
    for r in rows:
        if r.get("turn", 0) != 0:
            continue
        key = repr(r["state"])
        if key not in seen:
            seen.add(key)
            out.append([{"role": m["role"], "content": m["content"]} for m in r["state"]])
            if len(out) >= limit:
                break
    return out
