"""Planning in a dialog: best-of-n at the turn level, with the user simulator as the model.

Each assistant turn, sample n candidate replies per conversation; for each, roll the
simulated user's answer forward (`DialogEnv.step_batch`) and score the turn; keep the
candidate whose looked-ahead turn scores best, together with the user reply that was
simulated for it, and go on to the next turn. The environment model is used here the way
model-based RL uses one: to try actions before taking them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.generation import decode_completions, encode_prompts, sample


@dataclass
class DialogPlan:
    totals: list[float]  # undiscounted sum of the chosen turns' scores, per episode
    transcripts: list[list[dict]]  # per episode: user / assistant messages with turn scores
    candidate_scores: list[list[list[float]]]  # per episode, per turn: the n looked-ahead scores
    reward_calls: int  # scored candidate turns (each also cost one simulated user reply)


@torch.no_grad()
def plan_dialog(model, env, rows: list[dict], n: int, *, generator: torch.Generator | None = None) -> DialogPlan:
    cfg = env.cfg
    states = [env.reset(r) for r in rows]
    totals = [0.0] * len(rows)
    cand_scores: list[list[list[float]]] = [[] for _ in rows]
    turn_scores: list[list[float]] = [[] for _ in rows]
    calls = 0
    for _turn in range(cfg.env.turns):
        rep_states = [s for s in states for _ in range(n)]
        ids, mask, _ = encode_prompts(model.tokenizer, [env.render(s) for s in rep_states], cfg.model.max_prompt_tokens, model.device)
        out, _, amask, _, _, ended = sample(model, ids, mask, cfg.generation, generator=generator, with_values=False)
        replies = decode_completions(model.tokenizer, out, amask, ended)
        look = env.step_batch(rep_states, replies, ended.tolist(), generator=generator)
        calls += len(rep_states)
        scores = torch.tensor(look.scored.scores).view(len(rows), n)
        pick = scores.argmax(-1).tolist()
        for i, j in enumerate(pick):
            cand_scores[i].append(scores[i].tolist())
            totals[i] += float(scores[i, j])
            turn_scores[i].append(float(scores[i, j]))
        states = [look.next_states[i * n + j] for i, j in enumerate(pick)]
    transcripts = []
    for s, ts in zip(states, turn_scores):
        turns, k = [], 0
        for m in s.messages:
            entry = {"role": m["role"], "content": m["content"]}
            if m["role"] == "assistant":
                entry["score"] = ts[k]
                k += 1
            turns.append(entry)
        transcripts.append(turns)
    return DialogPlan(totals, transcripts, cand_scores, calls)
