"""Real transitions, kept to learn an environment model from (`env.record_transitions`).

Every training episode (and every eval episode of a multi-turn environment) is written to
`RUN/transitions.jsonl`, one line per assistant turn — the article's (s, a, s', r) made
concrete for text, in gymnasium's terms:

    {"episode": "train-3-1", "source": "train", "step": 3, "turn": 0,
     "state": [messages before the action], "action": "…",
     "next_observation": [messages the environment answered with] | null (terminal),
     "reward": 0.4, "terms": {…}, "terminated": false, "truncated": false, "info": {…},
     "tokens": {"state": 57, "action": 12, "next_observation": 9}}

`terminated`: the environment ended the episode after this action; `truncated`: it was
cut (by the environment, or at `env.max_turns` / the dialog's turn count) with an
observation still to come. Token counts are of the message contents under the run's
tokenizer (the chat template's own tokens not included). A resumed run truncates the file
to its checkpoint's step, like metrics.jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "transitions.jsonl"


def _plain(m: dict) -> dict:
    return {"role": m["role"], "content": m["content"]}


def episode_transitions(turns: list[dict]) -> list[dict]:
    """One record per assistant turn of a transcript (messages; assistant ones carry
    `reward`, `terms`, `info` and optionally `truncated`)."""
    idx = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    out = []
    for k, i in enumerate(idx):
        end = idx[k + 1] if k + 1 < len(idx) else len(turns)
        nxt = [_plain(m) for m in turns[i + 1 : end]]
        last = k == len(idx) - 1
        a = turns[i]
        truncated = bool(a.get("truncated")) or (last and bool(nxt))
        out.append({
            "turn": k,
            "state": [_plain(m) for m in turns[:i]],
            "action": a["content"],
            "next_observation": nxt or None,
            "reward": float(a.get("reward", 0.0)),
            "terms": a.get("terms", {}),
            "terminated": last and not truncated,
            "truncated": truncated,
            "info": a.get("info", {}),
        })
    return out


def _count(tokenizer, msgs: list[dict] | None) -> int:
    if not msgs:
        return 0
    return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in msgs)


def text_transcript(prompt: str, completion: str, reward: float, terms: dict | None = None) -> list[dict]:
    """A single-turn (text env) episode in the transcript shape of the multi-turn envs."""
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": completion, "reward": float(reward), "terms": terms or {}}]


def batch_transcripts(batch) -> list[list[dict]]:
    """The episodes of a rollout batch as transcripts: a multi-turn env's own, or for the
    text env the prompt and the scored completion."""
    if "transcript" in batch.extras:
        return batch.extras["transcript"]
    terms = {k: v.tolist() for k, v in batch.reward_terms.items()}
    return [text_transcript(p, c, batch.scores[i], {k: v[i] for k, v in terms.items()})
            for i, (p, c) in enumerate(zip(batch.prompts, batch.completions))]


def eval_transcripts(side: dict) -> list[list[dict]]:
    """The episodes of one side of an eval result (`samples`): transcripts as they are, or
    built from a text eval's prompt, completion and reward."""
    return [s["turns"] if "turns" in s else text_transcript(s["prompt"], s["completion"], s["reward"]) for s in side["samples"]]


def record(path: Path, tokenizer, step: int, source: str, episodes: list[list[dict]]) -> int:
    """Append the transitions of `episodes` (transcripts) to `path`; returns the count."""
    lines = []
    for e, turns in enumerate(episodes):
        for t in episode_transitions(turns):
            t = {"episode": f"{source}-{step}-{e}", "source": source, "step": step, **t}
            t["tokens"] = {"state": _count(tokenizer, t["state"]), "action": _count(tokenizer, [{"content": t["action"]}]),
                           "next_observation": _count(tokenizer, t["next_observation"])}
            lines.append(json.dumps(t, ensure_ascii=False, default=repr))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(x + "\n" for x in lines))
        fh.flush()
    return len(lines)
