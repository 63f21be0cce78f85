"""Planning with a learned environment model: lookahead over imagined turns (issue 15).

Each turn, for every live episode of the *real* environment, the policy samples
`planner.n` candidate actions; each candidate is played `planner.depth` turns inside the
learned model (envmodel/, as an environment: envs/model.py) — the model answers and scores
the candidate, the policy answers the imagined observation, and so on — and is scored by

    G = Σ_{d<depth} γ^d · r̂_d  +  γ^depth · V(s_depth)

(γ = `env.turn_gamma`; the critic's value of the imagined state at the horizon when the
policy has one, the imagined episode is still running and the real episode's turn budget
is not reached there — a cut episode is not bootstrapped in training either —, else 0). The real environment
then takes the best candidate only: one real step per turn per episode, whatever n and
depth — every other step is imagined. Imagination stops at the real episode's turn budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.generation import decode_completions, encode_prompts, render_messages, sample


@dataclass
class Lookahead:
    totals: list[float]  # undiscounted sum of the real rewards of the chosen turns, per episode
    transcripts: list[list[dict]]
    success: list[bool]
    turns: list[int]
    truncated: list[bool]
    env_steps: int  # real environment steps (one per chosen turn)
    imagined_steps: int  # steps played inside the model while planning
    imagined_returns: list[list[list[float]]]  # per episode, per turn: each candidate's imagined G (the argmax was taken)


def _policy_turn(model, tok, convs, mcfg, gen, max_prompt_tokens, generator):
    prompts = [render_messages(tok, c, chat=mcfg.use_chat_template, system_prompt=mcfg.system_prompt) for c in convs]
    ids, mask, _ = encode_prompts(tok, prompts, max_prompt_tokens, model.device)
    out, _, amask, _, _, ended = sample(model, ids, mask, gen, generator=generator, with_values=False)
    return decode_completions(tok, out, amask, ended), ended.tolist()


def _horizon_values(model, tok, convs, mcfg, max_prompt_tokens) -> list[float]:
    if model.value_head is None or not convs:
        return [0.0] * len(convs)
    prompts = [render_messages(tok, c, chat=mcfg.use_chat_template, system_prompt=mcfg.system_prompt) for c in convs]
    ids, mask, _ = encode_prompts(tok, prompts, max_prompt_tokens, model.device)
    return model.state_values(ids, mask)[:, -1].tolist()


@torch.no_grad()
def plan_lookahead(model, env, imagine, rows, cfg, *, generator=None) -> Lookahead:
    """`env`: the real environment (with `messages(i)`); `imagine`: a ModelEnv over the learned model."""
    p, gen, mcfg, tok = cfg.planner, cfg.generation, cfg.model, model.tokenizer
    gamma, n, mpt = cfg.env.turn_gamma, p.n, mcfg.max_prompt_tokens
    env.begin(rows, training=False)
    B = len(rows)
    live = list(range(B))
    totals, turns, success, cut = [0.0] * B, [0] * B, [False] * B, [False] * B
    chosen_g: list[list[list[float]]] = [[] for _ in range(B)]
    real = imagined = 0
    for k in range(env.max_turns):
        if not live:
            break
        convs = [list(env.messages(i)) for i in live for _ in range(n)]
        cands, cand_ended = _policy_turn(model, tok, convs, mcfg, gen, mpt, generator)
        imagine.start_from(convs, turn=k)
        G = torch.zeros(len(convs))
        going = list(range(len(convs)))
        replies, ended = cands, cand_ended
        for d in range(min(p.depth, env.max_turns - k)):
            turn = imagine.advance(going, replies, [None] * len(going), ended, training=False, generator=generator)
            imagined += len(going)
            for j, r in zip(going, turn.rewards):
                G[j] += gamma**d * r
            going = [j for j, done in zip(going, turn.done) if not done]
            if not going or d == min(p.depth, env.max_turns - k) - 1:
                break
            replies, ended = _policy_turn(model, tok, [imagine.messages(j) for j in going], mcfg, gen, mpt, generator)
        h = min(p.depth, env.max_turns - k)
        if k + h < env.max_turns:  # at the turn budget the episode is cut: nothing follows to bootstrap
            for j, v in zip(going, _horizon_values(model, tok, [imagine.messages(j) for j in going], mcfg, mpt)):
                G[j] += gamma**h * v
        best = [a * n + int(G[a * n : (a + 1) * n].argmax()) for a in range(len(live))]
        turn = env.advance(live, [cands[j] for j in best], [None] * len(live), [cand_ended[j] for j in best], training=False,
                           generator=generator)
        real += len(live)
        nxt = []
        for a, i in enumerate(live):
            totals[i] += turn.rewards[a]
            turns[i] += 1
            chosen_g[i].append(G[a * n : (a + 1) * n].tolist())
            success[i] = bool(turn.infos[a].get("success", False)) if turn.infos else False
            if turn.done[a]:
                cut[i] = bool(turn.truncated[a]) if turn.truncated else False
            elif k == env.max_turns - 1:
                cut[i] = True
            else:
                nxt.append(i)
        live = nxt
    return Lookahead(totals, env.transcripts(), success, turns, cut, real, imagined, chosen_g)
