"""Decode-time planning: best-of-n, value-guided token MCTS, and the tree's KV-cache reuse."""

import math

import pytest
import torch

from dynalm.config import build_config
from dynalm.envs import TextEnv
from dynalm.errors import UserError
from dynalm.models.policy import PolicyValueModel
from dynalm.planning import PathReward, PlannerConfig, TokenMCTS, best_of_n_select, path_reward_for, plan
from dynalm.planning.mcts import decode
from dynalm.planning import kv as kvx
from dynalm.rewards import ScoredTerms
from dynalm.rl.batch import Batch
from dynalm.models.generation import encode_prompts
from dynalm.rl.objectives import add_token_rewards
from dynalm.rl.trainer import seed_everything

from conftest import tiny_overrides

ROWS = [{"prompt": "the cat sat on"}, {"prompt": "once upon a time"}]


class Rewards:
    """A RewardSet stand-in that counts its calls; `fn(completion) -> float`."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, prompts, completions, **extras):
        self.calls += 1
        vals = [float(self.fn(c)) for c in completions]
        return ScoredTerms({"r": vals}, vals)


def _setup(model_dir, prompts_file, reward=lambda c: len(c.split()), perturb=True, **extra):
    extra.setdefault("model", {})
    extra["model"] = {"value_head": True, "device": "cpu", **extra["model"]}
    cfg = build_config(tiny_overrides(model_dir, prompts_file, **extra))
    seed_everything(0)
    model = PolicyValueModel.from_config(cfg)
    if perturb:  # a policy that differs from the reference, and non-trivial values
        with torch.no_grad():
            for n, p in model.lm.named_parameters():
                if "lora_B" in n:
                    p.add_(0.5 * torch.randn_like(p))
            if model.value_head is not None:
                model.value_head.weight.normal_()
    return cfg, model, TextEnv(cfg, model.tokenizer, rewards=Rewards(reward))


def _full(model, tokens: list[int]):
    """Logits and V at the end of `tokens`, from one forward over the whole prefix (no cache)."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        out = model.lm(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
        v = model.value_head(out.hidden_states[-1][0, -1]).item() if model.value_head is not None else None
    return out.logits[0, -1], v


def _searched(model, env, cfg, pc: PlannerConfig, simulations: int | None = None):
    """A tree over ROWS[0]'s prompt after `simulations` (default pc.simulations) simulations; and the prompt ids."""
    model.eval()
    ids, _, _ = encode_prompts(model.tokenizer, [env.reset(ROWS[0])], 64, "cpu")
    tree = TokenMCTS(model, env, ROWS[0], ids, cfg.generation, pc, None)
    for _ in range(pc.simulations if simulations is None else simulations):
        tree.simulate()
    return tree, ids


def _close(a: float, b: float) -> bool:
    # values are a 32-term dot product of magnitude ~2: float32 rounding is relative
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)


def test_planner_config_fields():
    cfg = PlannerConfig()
    assert (cfg.name, cfg.n, cfg.rank_by, cfg.simulations, cfg.top_k) == ("sample", 4, "reward", 10, 10)
    assert (cfg.c_puct, cfg.temperature, cfg.kl_coef, cfg.seed) == (8.0, 0.0, None, 0)
    assert all(f.description for f in PlannerConfig.model_fields.values())
    with pytest.raises(Exception):
        PlannerConfig(simulatoins=3)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_kv_extend_matches_full_forward(fixture, request, prompts_file):
    """Prompt K/V + per-token K/V joined as the tree does == a full forward over the prefix."""
    cfg, model, _ = _setup(request.getfixturevalue(fixture), prompts_file)
    model.eval()
    ids, _, _ = encode_prompts(model.tokenizer, ["the cat sat on the"], 64, "cpu")
    prompt = ids[0].tolist()
    logits, v, root = kvx.prefill(model, model.lm, ids, want_values=True)
    full_logits, full_v = _full(model, prompt)
    assert torch.allclose(logits, full_logits, atol=1e-5) and _close(v, full_v)
    a, b = 9, 14  # two tokens appended one at a time, each with only its own K/V stored
    _, _, kv_a = kvx.extend(model, model.lm, root, a, True)
    assert kvx.length(kv_a) == 1
    logits, v, kv_b = kvx.extend(model, model.lm, kvx.join(root, [kv_a]), b, True)
    full_logits, full_v = _full(model, prompt + [a, b])
    assert torch.allclose(logits, full_logits, atol=1e-5) and _close(v, full_v)
    assert kvx.length(root) == len(prompt)  # the tree's tensors are never grown in place


def test_tree_nodes_match_full_forward(tiny_llama, prompts_file):
    """Every expanded node's value and child priors equal a full forward over its prefix."""
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 5, "stop_at_eos": False})
    pc = PlannerConfig(name="mcts", simulations=25, top_k=4)
    tree, ids = _searched(model, env, cfg, pc)
    checked, stack = 0, [(tree.root, [])]
    while stack:
        node, path = stack.pop()
        if not node.children:
            continue
        logits, v = _full(model, ids[0].tolist() + path)
        top = torch.topk(torch.log_softmax(logits, -1), pc.top_k)
        assert [c.token for c in node.children] == top.indices.tolist()
        assert torch.allclose(torch.tensor([c.prior for c in node.children]), torch.softmax(top.values, -1), atol=1e-5)
        assert _close(node.value, v)
        checked += len(path) >= 2
        stack += [(c, path + [c.token]) for c in node.children]
    assert checked >= 2  # nodes two or more tokens deep were reached through the joined cache
    assert tree.forward_passes <= 1 + pc.simulations  # prefill + at most one forward per simulation


def test_visit_counts_sum_to_simulations(tiny_llama, prompts_file):
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 4, "stop_at_eos": False})
    pc = PlannerConfig(name="mcts", simulations=12, top_k=5)
    res = plan(model, env, ROWS, cfg.generation, pc, max_prompt_tokens=64)
    for steps in res.search:
        assert len(steps) == 4 and steps[0].carried == 0  # the first root starts fresh
        for prev, step in zip(steps, steps[1:]):
            # the new root keeps its subtree: its children hold the visits it had, minus its own expansion
            assert step.carried == prev.visits[prev.token] - 1
        for step in steps:
            assert sum(step.visits.values()) == step.carried + pc.simulations
            assert step.token == max(step.visits, key=step.visits.get)  # temperature 0: most visited
    # one prefill per row and at most one forward per simulation
    assert res.forward_passes <= len(ROWS) * (1 + 4 * pc.simulations)
    assert len(res.completions) == len(ROWS) and res.ended == [False] * len(ROWS)  # no EOS stop: ran to the limit


def test_mcts_picks_the_valuable_token_that_sampling_misses(tiny_llama, prompts_file, monkeypatch):
    """A value function that likes one unlikely first token: mcts finds it, greedy and sampling do not."""
    gen = {"max_new_tokens": 2, "stop_at_eos": False}
    cfg, model, env = _setup(tiny_llama, prompts_file, perturb=False, generation=gen)
    tok, row = model.tokenizer, ROWS[0]
    first = lambda res: res.completions[0].split()[0]  # noqa: E731
    greedy = first(plan(model, env, [row], cfg.generation, PlannerConfig(name="greedy"), max_prompt_tokens=64))
    sampled = first(plan(model, env, [row], cfg.generation, PlannerConfig(name="sample"), max_prompt_tokens=64))
    # the good token: the least likely of the policy's top 10 that neither picked
    ids, _, _ = encode_prompts(tok, [env.reset(row)], 64, "cpu")
    logits, _ = _full(model, ids[0].tolist())
    top = torch.topk(torch.softmax(logits, -1), 10)
    words = [tok.convert_ids_to_tokens(i) for i in top.indices.tolist()]
    good = [w for w in words if w not in (greedy, sampled, "</s>")][-1]
    good_id = tok.convert_tokens_to_ids(good)
    assert top.values[words.index(good)] < 0.1 and words[0] != good

    # V(s) = 1 for prefixes ending in the good token, else 0; the reward agrees on finished text
    def step_logits(lm, input_ids, attention_mask, position_ids, past, want_values):
        logits, values, past = PolicyValueModel.step_logits(model, lm, input_ids, attention_mask, position_ids, past, want_values)
        if values is not None:
            values = (input_ids[:, -1] == good_id).float()
        return logits, values, past

    monkeypatch.setattr(model, "step_logits", step_logits)
    env.rewards = Rewards(lambda c: float(c.split()[:1] == [good]))
    # default c_puct (8) explores hard on a 0..1 value scale: give it enough simulations to settle
    res = plan(model, env, [row], cfg.generation, PlannerConfig(name="mcts", simulations=100), max_prompt_tokens=64)
    assert first(res) == good != greedy and good != sampled
    visits = res.search[0][0].visits
    assert max(visits, key=visits.get) == good_id


@pytest.mark.parametrize("scale,shift", [(100.0, 5.0), (0.01, -3.0)])
def test_normalized_q_makes_the_search_independent_of_the_value_scale(scale, shift, tiny_llama, prompts_file, monkeypatch):
    """With planner.normalize_q, values a·V + b (a > 0) give the same tree as V."""
    gen = {"max_new_tokens": 4, "stop_at_eos": False}
    cfg, model, env = _setup(tiny_llama, prompts_file, generation=gen)
    orig = model.step_logits

    def run(a, b, normalize):
        env.rewards = Rewards(lambda c: a * 0.0 + b)  # finished leaves: the same transform of a zero reward
        def step_logits(lm, input_ids, attention_mask, position_ids, past, want_values):
            logits, values, past = orig(lm, input_ids, attention_mask, position_ids, past, want_values)
            return logits, (a * values.double() + b if values is not None else None), past  # float64: no rounding ties

        monkeypatch.setattr(model, "step_logits", step_logits)
        pc = PlannerConfig(name="mcts", simulations=12, c_puct=1.0, normalize_q=normalize)
        res = plan(model, env, ROWS[:1], cfg.generation, pc, max_prompt_tokens=64)
        return [s.visits for s in res.search[0]]

    assert run(scale, shift, True) == run(1.0, 0.0, True)
    assert run(scale, shift, False) != run(1.0, 0.0, False)  # raw Q: the scale changes the search


def test_mcts_with_reward_leaves_needs_no_value_head(tiny_llama, prompts_file):
    """planner.leaf=reward scores unfinished leaves by the reward of the partial text: a reward
    that likes one word steers the search to it from the first token, without a value head."""
    gen = {"max_new_tokens": 3, "stop_at_eos": False}
    cfg, model, env = _setup(tiny_llama, prompts_file, perturb=False, generation=gen, model={"value_head": False},
                             algorithm={"name": "grpo", "num_generations": 2})
    assert model.value_head is None
    with pytest.raises(UserError, match="needs a value head"):
        plan(model, env, ROWS[:1], cfg.generation, PlannerConfig(name="mcts"), max_prompt_tokens=64)
    tok, row = model.tokenizer, ROWS[0]
    ids, _, _ = encode_prompts(tok, [env.reset(row)], 64, "cpu")
    logits, _ = _full(model, ids[0].tolist())
    top = torch.topk(logits, 10).indices.tolist()
    good = [w for w in (tok.convert_ids_to_tokens(i) for i in top[1:]) if w != "</s>"][-1]  # not the likeliest
    env.rewards = Rewards(lambda c: float(c.split()[:1] == [good]))
    res = plan(model, env, [row], cfg.generation, PlannerConfig(name="mcts", leaf="reward", simulations=60), max_prompt_tokens=64)
    assert res.completions[0].split()[0] == good
    calls = env.rewards.calls
    assert calls == res.reward_calls > 0  # one reward call per evaluated leaf (and the root)


@pytest.mark.parametrize(
    "pc",
    [
        PlannerConfig(name="sample", seed=3),
        PlannerConfig(name="best-of-n", n=3, seed=3),
        PlannerConfig(name="mcts", simulations=6, top_k=5, temperature=1.0, seed=3),
        PlannerConfig(name="mcts", leaf="rollout", simulations=4, top_k=5, seed=3),
    ],
    ids=lambda pc: f"{pc.name}-{pc.leaf}" if pc.name == "mcts" else pc.name,
)
def test_same_seed_same_output(pc, tiny_llama, prompts_file):
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 5})
    a = plan(model, env, ROWS, cfg.generation, pc, max_prompt_tokens=64)
    b = plan(model, env, ROWS, cfg.generation, pc, max_prompt_tokens=64)
    assert (a.completions, a.ended, a.forward_passes) == (b.completions, b.ended, b.forward_passes)


def test_best_of_n_select_is_argmax():
    scores = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert best_of_n_select(scores).tolist() == [max(range(5), key=lambda j: scores[i, j]) for i in range(7)]
    assert best_of_n_select(torch.tensor([[1.0, 3.0, 3.0]])).tolist() == [1]  # first on ties


def test_best_of_n_by_reward_returns_best_candidate(tiny_llama, prompts_file):
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 6})
    pc = PlannerConfig(name="best-of-n", n=4)
    res = plan(model, env, ROWS, cfg.generation, pc, max_prompt_tokens=64)
    assert env.rewards.calls == 1  # all rows × n candidates scored in one batched call
    for comp, cands, scores in zip(res.completions, res.candidates, res.candidate_scores):
        assert len(cands) == pc.n and scores == [len(c.split()) for c in cands]
        assert comp == cands[max(range(pc.n), key=scores.__getitem__)]


def test_best_of_n_by_value_makes_no_reward_call(tiny_llama, prompts_file):
    def boom(c):
        raise AssertionError("the reward was called")

    cfg, model, env = _setup(tiny_llama, prompts_file, reward=boom, generation={"max_new_tokens": 6})
    res = plan(model, env, ROWS, cfg.generation, PlannerConfig(name="best-of-n", n=3, rank_by="value"), max_prompt_tokens=64)
    assert env.rewards.calls == 0
    for comp, cands, scores in zip(res.completions, res.candidates, res.candidate_scores):
        assert comp == cands[max(range(3), key=scores.__getitem__)]

    cfg, model, env = _setup(
        tiny_llama, prompts_file, model={"value_head": False}, algorithm={"name": "grpo", "num_generations": 2}
    )
    with pytest.raises(UserError, match="value head"):
        plan(model, env, ROWS, cfg.generation, PlannerConfig(name="best-of-n", rank_by="value"), max_prompt_tokens=64)
    with pytest.raises(UserError, match="value head"):
        plan(model, env, ROWS, cfg.generation, PlannerConfig(name="mcts"), max_prompt_tokens=64)


@pytest.mark.parametrize("rank_by", ["reward", "value"])
def test_best_of_n_decodes_many_candidates_in_bounded_batches(rank_by, tiny_llama, prompts_file, monkeypatch):
    """rows × n above CANDIDATES_PER_BATCH are decoded in batches of at most that many rows
    (best-of-428 on 16 prompts in one batch was killed at 24 GB), and each row still gets the
    best of its own n candidates."""
    import dynalm.planning.planner as planner

    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 6})
    sizes, real_sample = [], planner.sample

    def counting(model, ids, *a, **kw):
        sizes.append(ids.shape[0])
        return real_sample(model, ids, *a, **kw)

    monkeypatch.setattr(planner, "sample", counting)
    monkeypatch.setattr(planner, "CANDIDATES_PER_BATCH", 4)
    res = plan(model, env, ROWS, cfg.generation, PlannerConfig(name="best-of-n", n=3, rank_by=rank_by), max_prompt_tokens=64)
    assert sizes == [4, 2]  # 2 rows × 3 candidates
    assert 2 <= res.forward_passes <= 2 * 6 and len(res.completions) == 2
    for comp, cands, scores in zip(res.completions, res.candidates, res.candidate_scores):
        assert len(cands) == len(scores) == 3
        if rank_by == "reward":
            assert scores == [len(c.split()) for c in cands]
        assert comp == cands[max(range(3), key=scores.__getitem__)]


def test_mcts_kl_term_matches_reference_logprobs(tiny_llama, prompts_file):
    """With kl_coef > 0 a child's path reward is −kl_coef·(log π − log π_ref) of its token."""
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 3, "stop_at_eos": False})
    pc = PlannerConfig(name="mcts", simulations=8, top_k=4, kl_coef=0.5)
    tree, ids = _searched(model, env, cfg, pc, simulations=0)
    assert tree.forward_passes == 2  # the prompt's prefill, with the policy and the reference
    for c in tree.root.children:
        full = torch.cat([ids, torch.tensor([[c.token]])], 1)
        lp = model(full, torch.ones_like(full), 1, entropy=False).logprobs.item()
        ref = model.reference_logprobs(full, torch.ones_like(full), 1).item()
        assert abs(c.path_reward + 0.5 * (lp - ref)) < 1e-5
    assert any(abs(c.path_reward) > 1e-3 for c in tree.root.children)  # the perturbed adapter moved the policy
    res = plan(model, env, ROWS[:1], cfg.generation, pc, max_prompt_tokens=64)
    assert res.forward_passes <= 2 * (1 + 3 * pc.simulations)


def _walk(node):
    yield node
    for c in node.children:
        yield from _walk(c)


def test_rollout_leaves_score_whole_texts_and_keep_them_in_the_tree(tiny_llama, prompts_file):
    """planner.leaf=rollout: each simulation ends in a finished text scored by the true reward;
    the rollouts stay in the tree (Q = mean reward of the texts through a node); the search
    runs once and the emitted text is the most visited path, itself one of the rollouts."""
    T = 5
    seen = []

    def reward(c):
        seen.append(c)
        return len(set(c)) / 10  # a reward of the finished text only (asserted below)

    cfg, model, env = _setup(
        tiny_llama, prompts_file, reward=reward, perturb=False, generation={"max_new_tokens": T, "stop_at_eos": False},
        model={"value_head": False}, algorithm={"name": "grpo", "num_generations": 2},
    )
    pc = PlannerConfig(name="mcts", leaf="rollout", simulations=9, top_k=4, c_puct=1.0)
    tree, _ = _searched(model, env, cfg, pc)
    nodes = list(_walk(tree.root))
    finished = [n for n in nodes if n.terminal and n.visits]
    assert tree.root.visits == pc.simulations
    # every reward call was a whole T-token text (stop_at_eos is off), one per new finished leaf
    assert tree.reward_calls == len(seen) == len(finished) <= pc.simulations
    assert all(n.depth == T for n in finished)
    # visits and value sums add up: a node's visits are its children's, its value sum theirs
    for n in nodes:
        if n.visits and not n.terminal:
            assert n.visits == sum(c.visits for c in n.children)
            assert math.isclose(n.value_sum, sum(c.value_sum for c in n.children), abs_tol=1e-9)
    assert math.isclose(tree.root.value_sum, sum(n.value_sum for n in finished), abs_tol=1e-9)
    # each expanded node cost one forward: the prefill plus the non-finished nodes on the rollouts
    assert tree.forward_passes == 1 + sum(1 for n in nodes if n.children and n is not tree.root)

    res = plan(model, env, ROWS[:1], cfg.generation, pc, max_prompt_tokens=64)
    steps = res.search[0]
    assert len(steps) == T and sum(steps[0].visits.values()) == pc.simulations
    for prev, step in zip(steps, steps[1:]):  # no search after the first token: only carried visits
        assert sum(step.visits.values()) == step.carried == prev.visits[prev.token]
        assert step.visits[step.token] == max(step.visits.values())
    assert res.completions[0] in seen[-res.reward_calls:]  # the emitted text is one of its own rollouts
    assert res.forward_passes <= 1 + pc.simulations * T


def test_rollout_leaves_subtract_the_path_kl(tiny_llama, prompts_file):
    """With kl_coef > 0 a rollout's score is its text's reward minus kl_coef·Σ(log π − log π_ref)
    over all of its tokens, the ones sampled during the rollout included."""
    T, fn = 4, lambda c: len(c) / 10  # noqa: E731
    cfg, model, env = _setup(tiny_llama, prompts_file, reward=fn, generation={"max_new_tokens": T, "stop_at_eos": False})
    pc = PlannerConfig(name="mcts", leaf="rollout", simulations=5, top_k=4, kl_coef=0.5)
    tree, ids = _searched(model, env, cfg, pc)
    finished = [n for n in _walk(tree.root) if n.terminal and n.visits]
    assert finished
    for leaf in finished:
        tokens = [n.token for n in tree._path(leaf)]
        full = torch.cat([ids, torch.tensor([tokens])], 1)
        lp = model(full, torch.ones_like(full), T, entropy=False).logprobs.sum().item()
        ref = model.reference_logprobs(full, torch.ones_like(full), T).sum().item()
        assert abs(leaf.path_reward + 0.5 * (lp - ref)) < 1e-4 and abs(leaf.path_reward) > 1e-3
        assert math.isclose(leaf.value, fn(decode(model.tokenizer, tokens, False)) + leaf.path_reward, abs_tol=1e-9)


def test_rollout_leaves_find_a_reward_that_partial_text_hides(tiny_llama, prompts_file):
    """A reward paid only on the finished text, for a first word that is not the likeliest:
    value-free rollout search finds it; greedy decoding does not."""
    gen = {"max_new_tokens": 3, "stop_at_eos": False}
    cfg, model, env = _setup(tiny_llama, prompts_file, perturb=False, generation=gen, model={"value_head": False},
                             algorithm={"name": "grpo", "num_generations": 2})
    tok, row = model.tokenizer, ROWS[0]
    ids, _, _ = encode_prompts(tok, [env.reset(row)], 64, "cpu")
    logits, _ = _full(model, ids[0].tolist())
    top = torch.topk(logits, 6).indices.tolist()
    good = [w for w in (tok.convert_ids_to_tokens(i) for i in top[1:]) if w != "</s>"][-1]
    env.rewards = Rewards(lambda c: float(len(c.split()) >= 2 and c.split()[0] == good))
    greedy = plan(model, env, [row], cfg.generation, PlannerConfig(name="greedy"), max_prompt_tokens=64)
    assert greedy.completions[0].split()[0] != good
    pc = PlannerConfig(name="mcts", leaf="rollout", simulations=40, top_k=6, c_puct=1.0)
    res = plan(model, env, [row], cfg.generation, pc, max_prompt_tokens=64)
    assert res.completions[0].split()[0] == good


@pytest.mark.parametrize("name", ["sample", "best-of-n", "mcts"])
def test_plan_reports_progress_per_finished_row(name, tiny_llama, prompts_file):
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 3})
    done = []
    res = plan(model, env, ROWS, cfg.generation, PlannerConfig(name=name, n=2, simulations=3, top_k=3),
               max_prompt_tokens=64, on_done=done.append)
    assert len(res.completions) == len(ROWS)
    assert done == ([1] * len(ROWS) if name == "mcts" else [len(ROWS)])  # mcts: one row at a time


def test_mcts_eval_does_not_depend_on_the_batch_size(tiny_llama, prompts_file):
    """Chunks of an eval continue one random stream: a repeated prompt is not replayed, and
    eval.batch_size changes nothing (it used to restart the stream at every chunk)."""
    from dynalm.evaluate import evaluate_side

    rows = [ROWS[0], ROWS[1], ROWS[0], ROWS[0]]
    outs = []
    for bs in (1, 4):
        cfg, model, env = _setup(
            tiny_llama, prompts_file, generation={"max_new_tokens": 4, "stop_at_eos": False},
            eval={"batch_size": bs}, planner={"name": "mcts", "leaf": "rollout", "simulations": 2, "top_k": 8},
        )
        outs.append([s["completion"] for s in evaluate_side(model, env, rows, cfg, use_reference=False)["samples"]])
    assert outs[0] == outs[1]
    assert len({outs[0][0], outs[0][2], outs[0][3]}) > 1  # the same prompt, three different searches


def test_rollout_emission_breaks_visit_ties_by_q(tiny_llama, prompts_file):
    cfg, model, env = _setup(tiny_llama, prompts_file, generation={"max_new_tokens": 3, "stop_at_eos": False})
    for leaf, expect in (("rollout", 2), ("value", 0)):  # value leaves keep ties on the higher prior
        tree, _ = _searched(model, env, cfg, PlannerConfig(name="mcts", leaf=leaf), simulations=0)
        kids = tree.root.children
        for c, (n, total) in zip(kids[:3], [(1, 0.2), (1, 0.5), (1, 0.9)]):
            c.visits, c.value_sum = n, total
        assert tree.choose() is kids[expect]
        kids[0].visits, kids[0].value_sum = 2, 0.4  # more visits win over a higher Q
        assert tree.choose() is kids[0]


def test_leaves_add_the_runs_per_token_rewards_on_one_scale(tiny_llama, prompts_file):
    """Issue 12.4: with per-token rewards (here the environment LM's α·log P_env and a2c's
    −β·KL), an open leaf used to score V(s) and a finished one its score alone. Now both add
    the per-token rewards along the path, exactly as the trainer computes them."""

    T, fn = 3, lambda c: len(c) / 10  # noqa: E731
    cfg, model, env = _setup(tiny_llama, prompts_file, reward=fn, generation={"max_new_tokens": T, "stop_at_eos": False},
                             algorithm={"name": "a2c"}, env={"fluency_coef": 0.3}, kl={"coef": 0.2})
    model.trained_beta = 0.25  # the run's adapted β, not kl.coef
    pr = path_reward_for(cfg, model)
    assert (pr.kl_coef, pr.fluency_coef) == (0.25, 0.3)
    model.eval()
    ids, _, _ = encode_prompts(model.tokenizer, [env.reset(ROWS[0])], 64, "cpu")
    tree = TokenMCTS(model, env, ROWS[0], ids, cfg.generation, PlannerConfig(name="mcts", simulations=12, top_k=3), None, pr)
    for _ in range(12):
        tree.simulate()
    scored = [n for n in _walk(tree.root) if n.value is not None and n is not tree.root]
    assert any(n.terminal for n in scored) and any(not n.terminal for n in scored)
    for leaf in scored:
        tokens = [n.token for n in tree._path(leaf)]
        full = torch.cat([ids, torch.tensor([tokens])], 1)
        k = len(tokens)
        batch = Batch(input_ids=full, attention_mask=torch.ones_like(full), action_mask=torch.ones(1, k),
                      logprobs=model(full, torch.ones_like(full), k, entropy=False).logprobs, values=None,
                      prompts=[""], completions=[""], group=torch.zeros(1), ended=torch.zeros(1, dtype=torch.bool))
        batch.ref_logprobs = model.reference_logprobs(full, torch.ones_like(full), k)
        batch.scores = torch.zeros(1)
        add_token_rewards(batch, 0.25, algorithm=cfg.algorithm, kl=cfg.kl, fluency_coef=cfg.env.fluency_coef,
                          max_new_tokens=cfg.generation.max_new_tokens)
        assert abs(leaf.path_reward - float(batch.rewards.sum())) < 1e-4  # the trainer's own per-token rewards
        assert abs(leaf.path_reward) > 1e-2
        if leaf.terminal:
            assert math.isclose(leaf.value, fn(decode(model.tokenizer, tokens, False)) + leaf.path_reward, abs_tol=1e-9)
        else:
            _, v = _full(model, ids[0].tolist() + tokens)
            assert _close(leaf.value, v + leaf.path_reward)
    # grpo/rloo trained no KL into their value: only the fluency term then
    cfg_g = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                                        env={"fluency_coef": 0.3}))
    assert path_reward_for(cfg_g, model) == PathReward(0.0, 0.3)
    cfg_k = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "a2c"}, planner={"kl_coef": 0.7}))
    assert path_reward_for(cfg_k, model) == PathReward(0.7, 0.0)


def test_rollouts_on_the_fast_decoder_build_the_same_tree(tiny_llama, prompts_file):
    """planner.leaf=rollout with generation.fast_decode: the rollout chains run on one static
    cache; the tree (tokens, priors, visits, per-node K/V) equals the transformers path's."""
    from dynalm.models.fastdecode import decoder_for

    trees, folded = {}, {}
    for fast in (True, False):
        cfg, model, env = _setup(
            tiny_llama, prompts_file, generation={"max_new_tokens": 6, "stop_at_eos": False, "fast_decode": fast},
            model={"value_head": False}, algorithm={"name": "grpo", "num_generations": 2},
        )
        pc = PlannerConfig(name="mcts", leaf="rollout", simulations=6, top_k=5, c_puct=1.0, seed=1)
        tree, _ = _searched(model, env, cfg, pc)
        trees[fast] = tree
        folded[fast] = decoder_for(model, model.lm)._layers
    assert folded[True] and not folded[False]  # the fast side ran on the fast decoder, the other did not
    a, b = list(_walk(trees[True].root)), list(_walk(trees[False].root))
    assert [(n.token, n.depth, n.visits) for n in a] == [(n.token, n.depth, n.visits) for n in b]
    assert all(math.isclose(x.prior, y.prior, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b))
    assert math.isclose(trees[True].root.value_sum, trees[False].root.value_sum, rel_tol=1e-6)
    assert trees[True].forward_passes == trees[False].forward_passes
    for x, y in zip(a, b):
        if x.kv is not None:
            assert all(torch.allclose(k1, k2, atol=1e-5) and torch.allclose(v1, v2, atol=1e-5)
                       for (k1, v1), (k2, v2) in zip(x.kv, y.kv))


@pytest.mark.parametrize("leaf", ["value", "rollout"])
def test_batched_waves_expand_nodes_as_full_forwards_do(leaf, tiny_llama, prompts_file, monkeypatch):
    """planner.batch_leaves: leaves chosen under virtual loss are expanded in one left-padded
    batched step (rollouts: one step per token for the whole wave); every expanded node's
    priors, value and K/V equal a batch-1 full forward over its own prefix, the virtual
    losses are all taken back, and the batched step did run."""
    from dynalm.models.fastdecode import decoder_for
    from dynalm.planning import wave

    lens, padded = [], wave._left_padded_cache
    monkeypatch.setattr(wave, "_left_padded_cache", lambda p, t: lens.append([kvx.length(x) for x in p]) or padded(p, t))
    rollout = leaf == "rollout"
    cfg, model, env = _setup(
        tiny_llama, prompts_file, perturb=True, generation={"max_new_tokens": 5, "stop_at_eos": False},
        model={"value_head": not rollout}, algorithm={"name": "grpo", "num_generations": 2},
    )
    # value leaves: 16 simulations, so that later waves mix depths (and so prefix lengths)
    pc = PlannerConfig(name="mcts", leaf=leaf, simulations=10 if rollout else 16, top_k=4, c_puct=1.0, batch_leaves=4)
    fast = decoder_for(model, model.lm)
    steps, step = [], fast.step
    fast.step = lambda tok, *a: steps.append(tok.shape[0]) or step(tok, *a)
    model.eval()
    ids, _, _ = encode_prompts(model.tokenizer, [env.reset(ROWS[0])], 64, "cpu")
    tree = TokenMCTS(model, env, ROWS[0], ids, cfg.generation, pc, None)
    first = tree.simulate_wave(4)
    assert first == 4
    # the first wave took the root's four likeliest children, one each (virtual loss + in-flight skip)
    assert [c.visits for c in tree.root.children] == [1, 1, 1, 1]
    assert steps[0] == 4  # the wave's leaves forwarded together
    used = first
    while used < pc.simulations:
        used += tree.simulate_wave(min(4, pc.simulations - used))
    assert used == pc.simulations and tree.root.visits == pc.simulations
    checked = 0
    for node in _walk(tree.root):
        assert node.virtual == [] and node.chain is None  # nothing left of the virtual losses
        if node.visits and not node.terminal and node.children:
            assert node.visits == sum(c.visits for c in node.children) + (0 if rollout or node is tree.root else 1)
        if not node.children or node is tree.root:
            continue
        path = tree._path(node)
        logits, v = _full(model, ids[0].tolist() + [n.token for n in path])
        top = torch.topk(torch.log_softmax(logits, -1), pc.top_k)
        assert [c.token for c in node.children] == top.indices.tolist()
        assert torch.allclose(torch.tensor([c.prior for c in node.children]), torch.softmax(top.values, -1), atol=1e-5)
        if not rollout:  # the fast step folds LoRA and fuses rms_norm: rounding differs from the full forward
            assert math.isclose(node.value, v, rel_tol=1e-4, abs_tol=1e-4)
        prefix = kvx.join(tree.root_kv, [n.kv for n in path[:-1]])
        _, _, own = kvx.extend(model, model.lm, prefix, node.token, False)
        assert all(torch.allclose(a, b, atol=1e-5) for (k1, v1), (k2, v2) in zip(node.kv, own) for a, b in ((k1, k2), (v1, v2)))
        checked += 1
    assert checked > pc.simulations if rollout else checked >= 4
    assert max(steps) > 1 and len(steps) < tree.forward_passes  # batched steps, fewer than the nodes they expanded
    assert any(len(set(x)) > 1 for x in lens)  # some wave mixed prefix lengths: the left padding was exercised



def _wave_tree(tiny_llama, prompts_file, reward, leaf: str, simulations: int):
    """A value-free policy and an MCTS over ROWS[0] with waves of 4 and the given reward."""
    cfg, model, env = _setup(
        tiny_llama, prompts_file, reward=reward, perturb=False, generation={"max_new_tokens": 5, "stop_at_eos": False},
        model={"value_head": False}, algorithm={"name": "grpo", "num_generations": 2},
    )
    pc = PlannerConfig(name="mcts", leaf=leaf, simulations=simulations, top_k=4, c_puct=1.0, batch_leaves=4)
    model.eval()
    ids, _, _ = encode_prompts(model.tokenizer, [env.reset(ROWS[0])], 64, "cpu")
    return cfg, model, env, pc, TokenMCTS(model, env, ROWS[0], ids, cfg.generation, pc, None)

def test_batched_rollout_waves_back_up_each_rollout_once(tiny_llama, prompts_file):
    """Rollout leaves in waves: every simulation is one reward of one finished text, the root's
    Q is their mean, and `plan` emits one of the rollouts, as with one leaf at a time."""
    seen = []

    def reward(c):
        seen.append(c)
        return len(set(c)) / 10

    cfg, model, env, pc, tree = _wave_tree(tiny_llama, prompts_file, reward, "rollout", 9)
    used = 0
    while used < pc.simulations:
        used += tree.simulate_wave(min(4, pc.simulations - used))
    finished = [n for n in _walk(tree.root) if n.terminal and n.visits]
    assert tree.reward_calls == len(seen) == len(finished)
    assert tree.root.visits == pc.simulations
    assert math.isclose(tree.root.value_sum, sum(n.value_sum for n in finished), abs_tol=1e-9)
    assert math.isclose(tree.root.value_sum, sum(n.visits * n.value for n in finished), abs_tol=1e-9)
    for n in finished:  # each rollout's reward sits on its own text's end (no shuffling between leaves)
        text = decode(model.tokenizer, [m.token for m in tree._path(n)], n.ended)
        assert n.value == len(set(text)) / 10
    res = plan(model, env, ROWS[:1], cfg.generation, pc, max_prompt_tokens=64)
    assert sum(res.search[0][0].visits.values()) == pc.simulations
    assert res.completions[0] in seen[-res.reward_calls:]


def test_batched_reward_leaves_score_a_wave_in_one_reward_call(tiny_llama, prompts_file):
    """leaf: reward in waves: each open leaf's partial text is scored in the same env.step as
    the wave's finished texts (a batch-level reward term sees the wave together), and each
    leaf's value is the reward of its own text."""

    def reward(c):
        return len(set(c)) / 10

    cfg, model, env, pc, tree = _wave_tree(tiny_llama, prompts_file, reward, "reward", 8)
    calls, step = [], env.step
    env.step = lambda rows, texts, ended: calls.append(len(texts)) or step(rows, texts, ended)
    assert tree.simulate_wave(4) == 4 and calls == [4]  # four leaves, one reward call
    for n in tree.root.children:  # the wave's leaves: the root's four children
        assert n.visits == 1 and n.value == reward(decode(model.tokenizer, [n.token], False))
    assert tree.simulate_wave(4) == 4 and calls == [4, 4]
