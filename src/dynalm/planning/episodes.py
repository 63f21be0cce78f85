"""Planning in any environment that can be forked: best-of-n at the turn level.

Each turn, every live episode is forked n times (`env.fork`: each copy with its own deep
copy of the user's environment); the policy samples one candidate action per copy, each
copy takes its step, and the episode continues as the copy whose turn scored best
(`env.adopt`): the environment itself is the model that is looked ahead with, as the dialog
planner does with its user simulator (planning/dialog.py). The score is the turn's reward
(the env's own plus the configured terms), so each turn costs n environment steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.generation import decode_completions, encode_prompts, sample


@dataclass
class EpisodePlan:
    totals: list[float]  # undiscounted sum of the chosen turns' rewards, per episode
    transcripts: list[list[dict]]  # per episode: the messages, each assistant turn with its reward
    success: list[bool]  # the last chosen turn's info said success
    turns: list[int]  # assistant turns taken
    truncated: list[bool]  # still running after env.max_turns, or cut by the env
    candidate_rewards: list[list[list[float]]]  # per episode, per turn: the n candidates' rewards
    env_steps: int  # environment steps taken, candidates included


@torch.no_grad()
def plan_episodes(model, env, rows: list[dict], n: int, gen, *, max_prompt_tokens: int, generator=None) -> EpisodePlan:
    tok, dev = model.tokenizer, model.device
    env.begin(rows, training=False)
    B = len(rows)
    live = list(range(B))
    totals, turns, success, cut = [0.0] * B, [0] * B, [False] * B, [False] * B
    cands: list[list[list[float]]] = [[] for _ in range(B)]
    steps = 0
    for k in range(env.max_turns):
        if not live:
            break
        fork = env.fork(live, n)
        prompts = [fork.render(j) for j in range(len(live) * n)]
        ids, mask, _ = encode_prompts(tok, prompts, max_prompt_tokens, dev)
        out, _, amask, _, _, ended = sample(model, ids, mask, gen, generator=generator, with_values=False)
        replies = decode_completions(tok, out, amask, ended)
        turn = fork.advance(list(range(len(replies))), replies, [None] * len(replies), ended.tolist(), training=False,
                            generator=generator)
        steps += len(replies)
        scores = torch.tensor(turn.rewards).view(len(live), n)
        nxt = []
        for a, i in enumerate(live):
            j = a * n + int(scores[a].argmax())
            env.adopt(i, fork, j)
            cands[i].append(scores[a].tolist())
            totals[i] += turn.rewards[j]
            turns[i] += 1
            success[i] = bool(turn.infos[j].get("success", False)) if turn.infos else False
            if turn.done[j]:
                cut[i] = bool(turn.truncated[j]) if turn.truncated else False
            elif k == env.max_turns - 1:
                cut[i] = True
            else:
                nxt.append(i)
        live = nxt
    return EpisodePlan(totals, env.transcripts(), success, turns, cut, cands, steps)
