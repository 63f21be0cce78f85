"""`plan()`: one entry point for every decoding strategy, with its cost in forward calls.

`forward_passes` counts calls into the model: a batched call counts once, so sampling
costs one call per generated position whatever the batch, best-of-n the same (its n
candidates share the batch, at n× the work per call), and mcts one call per expanded
node (two with the KL term: policy and reference) plus the prompt's prefill.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import GenerationConfig
from ..errors import UserError
from ..models.generation import decode_completions, encode_prompts, sample
from .config import PlannerConfig
from .mcts import PathReward, TokenMCTS, decode
from .tree import StepStats


@dataclass
class PlanResult:
    completions: list[str]
    ended: list[bool]  # stopped at EOS rather than at max_new_tokens
    forward_passes: int
    token_ids: list[list[int]] | None = None  # completion tokens per row (EOS included when reached)
    candidates: list[list[str]] | None = None  # best-of-n: every candidate, per row
    candidate_scores: list[list[float]] | None = None  # best-of-n: their ranking scores
    search: list[list[StepStats]] | None = None  # mcts: per row, per emitted token, the root's visits
    reward_calls: int = 0  # mcts: env.step calls made for finished leaves


# best-of-n decodes at most this many candidates together (their KV caches held at once): best-of-428
# on 16 prompts in one batch, 6,848 rows, took 24 GB and was killed; up to 512 rows it is one batch as before
CANDIDATES_PER_BATCH = 512


def best_of_n_select(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per row of `scores` [rows, n] (the first one on ties)."""
    return scores.argmax(dim=-1)


@torch.no_grad()
def plan(
    model,
    env,
    rows: list[dict],
    gen_cfg: GenerationConfig,
    planner_cfg: PlannerConfig,
    *,
    max_prompt_tokens: int,
    generator: torch.Generator | None = None,
    on_done: Callable[[int], None] | None = None,
    rng: random.Random | None = None,
    path_reward: PathReward | None = None,
) -> PlanResult:
    """Complete each row's prompt (`env.reset(row)`) with the configured planner.

    `generator` drives sample / greedy / best-of-n (default: seeded with planner_cfg.seed);
    mcts draws only from `rng` (visit sampling, rollouts; default: a fresh
    `random.Random(planner_cfg.seed)`) — pass the same `rng` to successive calls over chunks
    of rows so that they continue one stream rather than replay it.
    `on_done(k)` is told each time k more rows are finished (per row for mcts: a progress bar).
    `path_reward`: the per-token rewards mcts adds along a path (`mcts.path_reward_for(cfg,
    model)` gives a run's own); default: planner_cfg.kl_coef only.
    """
    on_done = on_done or (lambda k: None)
    if generator is None:
        generator = torch.Generator(device=model.device).manual_seed(planner_cfg.seed)
    states = [env.reset(r) for r in rows]
    name = planner_cfg.name
    if name in ("sample", "greedy"):
        ids, mask, _ = encode_prompts(model.tokenizer, states, max_prompt_tokens, model.device)
        out, _, amask, _, _, ended = sample(
            model, ids, mask, gen_cfg, generator=generator, with_values=False, greedy=name == "greedy"
        )
        on_done(len(rows))
        # sample() makes one step_logits call per generated position
        return PlanResult(
            decode_completions(model.tokenizer, out, amask, ended), ended.tolist(), amask.shape[1], _token_lists(out, amask)
        )
    if name == "best-of-n":
        res = _best_of_n(model, env, rows, states, gen_cfg, planner_cfg, max_prompt_tokens, generator)
        on_done(len(rows))
        return res
    if name == "mcts":
        return _mcts(model, env, rows, states, gen_cfg, planner_cfg, max_prompt_tokens, on_done, rng, path_reward)
    if name == "lookahead":
        raise UserError("planner 'lookahead' plans the turns of a multi-turn environment",
                        "use it with env.kind dialog, custom or model, or pick another planner")
    raise ValueError(f"unknown planner {name!r}")


def _best_of_n(model, env, rows, states, gen, cfg: PlannerConfig, max_prompt_tokens, generator) -> PlanResult:
    n = cfg.n
    by_value = cfg.rank_by == "value"
    if by_value and model.value_head is None:
        raise UserError(
            "best-of-n with rank_by 'value' needs a value head", "set model.value_head: true or rank_by: reward"
        )
    rep_rows = [r for r in rows for _ in range(n)]
    rep_states = [s for s in states for _ in range(n)]
    comps, end, toks, values_at_end, passes = [], [], [], [], 0
    for at in range(0, len(rep_states), CANDIDATES_PER_BATCH):  # one batch unless rows × n is large
        ids, mask, _ = encode_prompts(model.tokenizer, rep_states[at : at + CANDIDATES_PER_BATCH], max_prompt_tokens, model.device)
        out, _, amask, _, values, ended = sample(model, ids, mask, gen, generator=generator, with_values=by_value)
        comps += decode_completions(model.tokenizer, out, amask, ended)
        end += ended.tolist()
        toks += _token_lists(out, amask)
        passes += amask.shape[1]
        if by_value:
            # V(s) at the state that emitted each completion's last token (EOS or the final
            # token): for an EOS-ended completion that is its full text, the last state the
            # value head is trained on. It is already recorded by sample(): no extra forward.
            last = amask.sum(-1).long() - 1
            values_at_end.append(values.gather(-1, last[:, None]).squeeze(-1).float().cpu())
    if by_value:
        scores = torch.cat(values_at_end)
    else:
        _, scored, _ = env.step(rep_rows, comps, end)
        scores = torch.tensor(scored.scores, dtype=torch.float32)
    scores = scores.view(len(rows), n)
    pick = best_of_n_select(scores).tolist()
    return PlanResult(
        completions=[comps[i * n + j] for i, j in enumerate(pick)],
        ended=[end[i * n + j] for i, j in enumerate(pick)],
        forward_passes=passes,
        token_ids=[toks[i * n + j] for i, j in enumerate(pick)],
        candidates=[comps[i * n : (i + 1) * n] for i in range(len(rows))],
        candidate_scores=scores.tolist(),
    )


def _mcts(model, env, rows, states, gen, cfg: PlannerConfig, max_prompt_tokens, on_done, rng, path_reward) -> PlanResult:
    rng = rng if rng is not None else random.Random(cfg.seed)  # rows draw from it one after another
    was_training = model.training
    model.eval()
    completions, ended, search, passes, calls, token_ids = [], [], [], 0, 0, []
    try:
        for row, state in zip(rows, states):
            ids, _, _ = encode_prompts(model.tokenizer, [state], max_prompt_tokens, model.device)  # batch 1: no padding
            tree = TokenMCTS(model, env, row, ids, gen, cfg, rng, path_reward)
            tokens, end, stats = tree.run()
            completions.append(decode(model.tokenizer, tokens, end))
            token_ids.append(list(tokens))
            ended.append(end)
            search.append(stats)
            passes += tree.forward_passes
            calls += tree.reward_calls
            on_done(1)
    finally:
        model.train(was_training)
    return PlanResult(completions, ended, passes, token_ids, search=search, reward_calls=calls)


def _token_lists(out: torch.Tensor, amask: torch.Tensor) -> list[list[int]]:
    T = amask.shape[1]
    return [row[: int(m)] for row, m in zip(out[:, -T:].tolist(), amask.sum(-1).tolist())]
