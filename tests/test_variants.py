"""The algorithm table and the variants (issue 17): each loss against values computed by hand
from its paper's formula, and each variant trained from the CLI."""

import json
import math

import pytest
import torch
import yaml

from dynalm.cli import main
from dynalm.config import build_config
from dynalm.errors import UserError
from dynalm.rl import losses
from dynalm.rl.algorithms import ALGORITHMS
from dynalm.rl.batch import Batch
from dynalm.rl.objectives import add_advantages, add_token_rewards, zero_std_groups

from conftest import tiny_overrides

X = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_loss_aggregations_by_hand():
    assert float(losses.aggregate(X, M, "token_mean")) == pytest.approx(10 / 4)  # Σ / tokens
    assert float(losses.aggregate(X, M, "sequence_mean")) == pytest.approx((6 / 3 + 4 / 1) / 2)  # GRPO paper
    assert float(losses.aggregate(X, M, "constant", max_tokens=4)) == pytest.approx(10 / (2 * 4))  # Dr. GRPO
    with pytest.raises(ValueError):
        losses.aggregate(X, M, "mean")


def test_clip_higher_lets_a_good_unlikely_token_grow_further():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0]])
    m = torch.ones(1, 2)
    sym, st = losses.ppo_policy_loss(new, old, adv, m, 0.2)
    # token 0: min(1.5, 1.2)·1 = 1.2; token 1: min(0.5·−1, 0.8·−1) = −0.8
    assert float(sym) == pytest.approx(-(1.2 - 0.8) / 2)
    hi, st_hi = losses.ppo_policy_loss(new, old, adv, m, 0.2, clip_high=0.28)
    assert float(hi) == pytest.approx(-(1.28 - 0.8) / 2)
    assert float(st["clipfrac"]) == 1.0 and float(st_hi["clipfrac"]) == 1.0


def test_gspo_sequence_ratio_and_its_gradient_by_hand():
    """GSPO (Zheng et al. 2025): s_i = exp(mean_t log(π/π_old)), J = 1/G Σ_i min(s_i A_i, clip(s_i) A_i)."""
    old = torch.zeros(2, 2)
    lr = torch.tensor([[0.2, -0.4], [0.5, 0.0]])
    new = lr.clone().requires_grad_(True)
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, _ = losses.ppo_policy_loss(new, old, adv, m, 0.2, level="sequence", how="sequence_mean")
    s0, s1 = math.exp(-0.1), math.exp(0.5)  # row 0 inside the clip; row 1: A < 0, min picks the unclipped s1·A
    assert float(loss.detach()) == pytest.approx(-(s0 * 1.0 + s1 * -1.0) / 2, abs=1e-6)
    loss.backward()
    # ∂/∂lp_t of −½·s0·A0 with s0 = exp(mean of 2 tokens): −½·s0/2 each; row 1: −½·(−1)·s1 on its one token
    expect = torch.tensor([[-0.5 * s0 / 2, -0.5 * s0 / 2], [0.5 * s1, 0.0]])
    assert torch.allclose(new.grad, expect, atol=1e-6)


def test_truncated_importance_weights():
    lp = torch.log(torch.tensor([[3.0, 0.5, 1.0]]))
    roll = torch.zeros(1, 3)
    w = losses.truncated_is_weights(lp, roll, 2.0, torch.tensor([[1.0, 1.0, 0.0]]))
    assert torch.allclose(w, torch.tensor([[2.0, 0.5, 0.0]]))
    assert losses.truncated_is_weights(lp, None, 2.0, M) is None and losses.truncated_is_weights(lp, roll, None, M) is None


def _batch(logprobs, ref, mask, scores, group):
    B, T = mask.shape
    ids = torch.zeros(B, T + 1, dtype=torch.long)
    b = Batch(input_ids=ids, attention_mask=torch.cat([torch.ones(B, 1), mask], 1), action_mask=mask, logprobs=logprobs,
              values=None, prompts=[""] * B, completions=[""] * B, group=torch.tensor(group), ended=torch.ones(B, dtype=torch.bool))
    b.ref_logprobs, b.scores = ref, torch.tensor(scores)
    return b


def test_reinforce_pp_whitens_returns_to_go_over_the_batch(tiny_llama, prompts_file):
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "reinforce_pp"}))
    assert not cfg.use_value_head  # no critic
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-2.0, -2.0, -1.5], [-1.0, -3.0, 0.0]])
    b = _batch(lp, ref, mask, [1.0, 0.0], [0, 1])
    beta = 0.1
    add_token_rewards(b, beta, algorithm=cfg.algorithm, kl=cfg.kl, max_new_tokens=cfg.generation.max_new_tokens)
    r = torch.tensor([[-0.1, 0.0, -0.05 + 1.0], [0.0, -0.2 + 0.0, 0.0]])  # −β·(lp − ref), score on the last token
    assert torch.allclose(b.rewards, r, atol=1e-6)
    add_advantages(b, beta, algorithm=cfg.algorithm, kl=cfg.kl)
    g = [0.85, 0.95, 0.95, -0.2, -0.2]  # returns-to-go (γ = 1) of the five action tokens
    mean = sum(g) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in g) / 4)
    expect = torch.tensor([[g[0], g[1], g[2]], [g[3], g[4], mean]]) - mean
    expect = expect / sd * mask
    assert torch.allclose(b.advantages, expect, atol=1e-5)


def test_zero_variance_groups():
    assert zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), torch.tensor([0, 0, 1, 1, 2, 2])) == pytest.approx(2 / 3)


def test_every_algorithm_has_one_entry_and_a_summary():
    assert set(ALGORITHMS) == {"a2c", "ppo", "grpo", "rloo", "reinforce_pp"}
    from dynalm.config import AlgorithmConfig

    desc = AlgorithmConfig.model_fields["name"].description
    assert all(f"{n} = " in desc for n in ALGORITHMS)
    assert [n for n, a in ALGORITHMS.items() if a.critic] == ["a2c", "ppo"]


def test_refusals_keep_their_messages(tiny_llama, prompts_file):
    with pytest.raises(UserError, match="a2c's loss has none"):
        build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "a2c", "importance_sampling": "sequence"}))
    with pytest.raises(UserError, match="kl.estimator k3 as a reward gives reinforce_pp a biased KL gradient"):
        build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "reinforce_pp"}, kl={"estimator": "k3"}))
    from dynalm.distributed import check_world

    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2, "loss_agg": "constant"}))
    with pytest.raises(UserError, match="loss_agg constant is not supported in data-parallel runs yet"):
        check_world(cfg, 2)


VARIANTS = [
    ["algorithm.name=reinforce_pp"],
    ["algorithm.name=grpo", "algorithm.num_generations=2", "algorithm.loss_agg=constant", "algorithm.scale_rewards=false"],
    ["algorithm.name=grpo", "algorithm.num_generations=2", "algorithm.importance_sampling=sequence",
     "algorithm.loss_agg=sequence_mean", "algorithm.clip_range=0.004"],
    ["algorithm.name=grpo", "algorithm.num_generations=2", "algorithm.clip_range_high=0.28", "algorithm.epochs=2"],
    ["algorithm.name=ppo", "rollout.recompute_logprobs=true", "rollout.is_cap=2.0"],
]


def _train_cli(tiny_llama, prompts_file, tmp_path, sets, **extra) -> list[dict]:
    """Two steps of a tiny run from the CLI with `--set` for each of `sets`; the metrics."""
    over = tiny_overrides(tiny_llama, prompts_file, eval={"enabled": False}, train={"steps": 2, "batch_size": 4}, **extra)
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump(over))
    argv = ["train", "-c", str(c), "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sets", VARIANTS, ids=lambda s: s[-1].split("=")[0].split(".")[-1])
def test_each_variant_trains_from_the_cli(tiny_llama, prompts_file, tmp_path, sets):
    ms = _train_cli(tiny_llama, prompts_file, tmp_path, sets)
    assert len(ms) == 2 and all(math.isfinite(m["policy_loss"]) for m in ms)
    assert ("groups/zero_std_frac" in ms[0]) == any("num_generations" in s for s in sets)
    # the LoRA weights moved
    assert any(abs(m["grad_norm"]) > 0 for m in ms)


# ----------------------------------------------------------------------------- DAPO: dynamic sampling, overlong


def _rollout_like(P, T, scores, n=2, first_tok=5):
    B = len(scores)
    ids = torch.arange(B * (P + T)).view(B, P + T) + first_tok
    attn = torch.ones(B, P + T)
    attn[0, 0] = 0  # a left-padded prompt
    am = torch.ones(B, T)
    am[-1, -1] = 0  # a right-padded completion
    b = Batch(input_ids=ids, attention_mask=attn, action_mask=am, logprobs=-am, values=None,
              prompts=[f"p{i // n}" for i in range(B)], completions=[f"c{i}" for i in range(B)],
              group=torch.arange(B) // n, ended=torch.ones(B, dtype=torch.bool), extras={"row": list(range(B))})
    b.scores = torch.tensor(scores)
    b.reward_terms = {"r": torch.tensor(scores)}
    return b


def test_batch_concat_repads_prompts_left_and_completions_right():
    a, b = _rollout_like(3, 2, [1.0, 0.0]), _rollout_like(2, 4, [0.5, 0.5], first_tok=100)
    c = Batch.concat([a, b], pad_id=0)
    assert c.input_ids.shape == (4, 3 + 4) and c.n_actions == 4
    assert torch.equal(c.input_ids[0, :5], a.input_ids[0]) and c.input_ids[0, 5:].tolist() == [0, 0]
    assert c.input_ids[2, 0] == 0 and torch.equal(c.input_ids[2, 1:], b.input_ids[0])
    assert c.attention_mask[2].tolist() == [0, 0, 1, 1, 1, 1, 1] and c.attention_mask[0].tolist() == [0, 1, 1, 1, 1, 0, 0]
    assert c.action_mask[1].tolist() == [1, 0, 0, 0] and c.action_mask[3].tolist() == [1, 1, 1, 0]
    assert c.scores.tolist() == [1.0, 0.0, 0.5, 0.5] and c.extras["row"] == [0, 1, 0, 1] and c.completions[2] == "c0"


def test_dynamic_sampling_replaces_flat_groups():
    from dynalm.rl.dynamic_sampling import refill_flat_groups

    batch = _rollout_like(3, 2, [1.0, 0.0, 2.0, 2.0])  # group 1 is flat
    draws = iter([_rollout_like(2, 3, [5.0, 5.0]), _rollout_like(2, 3, [3.0, 4.0])])  # flat, then informative
    out, info = refill_flat_groups(batch, lambda k: next(draws), 2, 3)
    assert out.scores.tolist() == [1.0, 0.0, 3.0, 4.0] and out.group.tolist() == [0, 0, 1, 1]
    assert info == {"dynamic/flat_share": 0.5, "dynamic/rounds": 2, "dynamic/extra_groups": 2, "dynamic/still_flat": 0}
    # never informative: after max_rounds the batch keeps its size with the flat group back
    out, info = refill_flat_groups(batch, lambda k: _rollout_like(2, 3, [7.0, 7.0]), 2, 2)
    assert out.scores.tolist() == [1.0, 0.0, 2.0, 2.0] and info["dynamic/still_flat"] == 1 and info["dynamic/rounds"] == 2


def test_overlong_penalty_by_hand():
    from dynalm.rl.objectives import overlong_penalty

    # DAPO eq. 13 with L_max = 10, L_cache = 4: 0 up to 6 tokens, then linear to −1 at 10
    assert overlong_penalty(torch.tensor([3, 6, 8, 10]), 10, 4).tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(torch.tensor([9]), 10, 4, coef=0.5).tolist() == [-0.375]


@pytest.mark.parametrize("sets,key", [
    (["algorithm.dynamic_sampling=true", "algorithm.dynamic_sampling_max_rounds=2"], "dynamic/flat_share"),
    (["algorithm.overlong_buffer=2"], "reward/overlong"),
])
def test_dapo_options_train_from_the_cli(tiny_llama, prompts_file, tmp_path, sets, key):
    ms = _train_cli(tiny_llama, prompts_file, tmp_path, sets, algorithm={"name": "grpo", "num_generations": 2})
    assert all(key in m for m in ms)
    if key == "dynamic/flat_share":
        assert all(m["reward_calls"] >= 4 * m["step"] for m in ms)
    else:
        assert all(-1.0 <= m[key] <= 0.0 for m in ms)


def test_dapo_refusals(tiny_llama, prompts_file):
    with pytest.raises(UserError, match="dynamic_sampling needs prompt groups"):
        build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2, "dynamic_sampling": True},
                                    dyna={"enabled": True}))
    with pytest.raises(UserError, match=r"overlong_buffer \(9\) must not exceed generation.max_new_tokens \(6\)"):
        build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"overlong_buffer": 9}))


def test_constant_aggregation_divides_by_the_env_turn_budget(tiny_llama, prompts_file):
    """Review finding: Dr. GRPO's constant used env.max_turns (8 by default) for every env."""
    from dynalm.rl.objectives import assistant_turns

    base = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})
    assert assistant_turns(build_config(base).env) == 1
    from types import SimpleNamespace as NS

    assert assistant_turns(NS(kind="dialog", turns=3, max_turns=8)) == 3
    assert assistant_turns(NS(kind="custom", turns=3, max_turns=5)) == 5


@pytest.mark.parametrize("algo,match", [
    ({"name": "grpo", "num_generations": 2, "clip_range_high": 0.1}, r"clip_range_high \(0.1\) must be at least clip_range \(0.2\)"),
    ({"name": "a2c", "clip_range_high": 0.3}, "clip_range_high needs a clipped ratio; a2c's loss has none"),
    ({"name": "reinforce_pp", "whiten_advantages": False}, "reinforce_pp normalises its advantages over the batch by definition"),
    ({"name": "ppo", "num_generations": 2, "dynamic_sampling": True}, "dynamic_sampling refills prompt groups of a group baseline"),
])
def test_variant_settings_that_do_nothing_are_refused(tiny_llama, prompts_file, algo, match):
    with pytest.raises(UserError, match=match):
        build_config(tiny_overrides(tiny_llama, prompts_file, algorithm=algo))


def test_every_algorithm_is_named_in_the_cli_help_and_the_unknown_key_hint_is_a_real_command(capsys):
    from dynalm.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    train_help = next(c.help for c in sub._choices_actions if c.dest == "train")
    assert all(name in train_help for name in ALGORITHMS)
    with pytest.raises(UserError) as e:
        build_config({"model": {"name": "x"}, "zzzz": 1})
    assert e.value.fix == "run `dynalm config` to see every valid key"
    assert main(["config", "--set", "train.steps=3"]) == 0 and "steps: 3" in capsys.readouterr().out


def test_entropy_bonus_gradient_and_an_entropy_metric_without_a_graph(tiny_llama, prompts_file):
    """With ent_coef c the loss's gradient is the ent_coef-0 gradient minus c·∇(mean entropy);
    with c = 0 the entropy is only a metric and keeps no graph (its [B, T, vocab] tensors are
    freed before the backward pass)."""
    from dynalm.models.generation import encode_prompts, sample
    from dynalm.models.policy import PolicyValueModel
    from dynalm.rl.objectives import minibatch_loss

    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2}))
    torch.manual_seed(0)
    model = PolicyValueModel.from_config(cfg)
    ids, mask, _ = encode_prompts(model.tokenizer, ["the cat", "the cat", "a dog ran", "a dog ran"], 16, "cpu")
    ids, attn, am, lp, _, ended = sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(0))
    b = Batch(ids, attn, am, lp, None, ["p"] * 4, ["c"] * 4, torch.tensor([0, 0, 1, 1]), ended)
    b.advantages, b.ref_logprobs = torch.tensor([1.0, -1.0, 0.5, -0.5])[:, None] * am, lp.clone()
    params = model.policy_parameters()

    def grads(coef):
        algo = cfg.algorithm.model_copy(update={"ent_coef": coef})
        loss, parts = minibatch_loss(model, b, b.n_actions, algorithm=algo, beta=0.0, temperature=1.0, max_tokens=8)
        return torch.autograd.grad(loss, params), parts

    g0, parts0 = grads(0.0)
    assert not parts0["entropy"].requires_grad
    g1, parts1 = grads(0.3)
    assert torch.allclose(parts0["entropy"], parts1["entropy"].detach())
    out = model(b.input_ids, b.attention_mask, b.n_actions)
    ge = torch.autograd.grad(losses.entropy_bonus(out.entropy, am), params)
    assert max(float(x.abs().max()) for x in ge) > 0
    for a, c, e in zip(g0, g1, ge):
        assert torch.allclose(c, a - 0.3 * e, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_logits_chunks_give_the_same_loss_and_gradient(fixture, request, prompts_file):
    """train.logits_chunk: the LM head in chunks of rows, recomputed in the backward pass;
    the same log-probs, entropies and gradients as the whole batch at once."""
    from dynalm.models.generation import encode_prompts, sample
    from dynalm.models.policy import PolicyValueModel

    cfg = build_config(tiny_overrides(request.getfixturevalue(fixture), prompts_file, train={"logits_chunk": 2}))
    torch.manual_seed(0)
    model = PolicyValueModel.from_config(cfg)
    assert model.logits_chunk == 2
    ids, mask, _ = encode_prompts(model.tokenizer, ["the cat", "a dog ran far", "red", "once upon a time", "sun"], 16, "cpu")
    ids, attn, am, *_ = sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    res = {}
    for chunk in (0, 2):  # 5 rows: chunks of 2, 2 and 1
        model.logits_chunk = chunk
        out = model(ids, attn, am.shape[1], temperature=0.7)
        loss = (out.logprobs * am).sum() + 0.3 * (out.entropy * am).sum() + (out.values * am).sum()
        res[chunk] = out, torch.autograd.grad(loss, params)
    (a, ga), (b, gb) = res[0], res[2]
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-6) and torch.allclose(a.entropy, b.entropy, atol=1e-5)
    assert torch.allclose(a.values, b.values, atol=1e-6)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb)) and any(float(x.abs().max()) > 0 for x in ga)
    # the no-grad passes over the whole batch (reference, recompute) run the head in chunks too,
    # without checkpointing: the head sees 2, 2 and 1 rows, and the numbers are the same
    rows = []
    # (the LM's own forward applies the head at its one kept position: not a chunk)
    hook = model.lm.get_output_embeddings().register_forward_hook(
        lambda m, i, o: rows.append(i[0].shape[0]) if i[0].shape[1] > 1 else None
    )
    with torch.no_grad():
        nograd = model(ids, attn, am.shape[1], temperature=0.7)
        ref = model.reference_logprobs(ids, attn, am.shape[1], temperature=0.7)
    hook.remove()
    assert rows == [2, 2, 1, 2, 2, 1] and torch.allclose(nograd.logprobs, a.logprobs, atol=1e-6)
    model.logits_chunk = 0
    assert torch.allclose(ref, model.reference_logprobs(ids, attn, am.shape[1], temperature=0.7), atol=1e-6)


def test_logits_chunk_refuses_a_model_that_transforms_its_logits(tiny_llama, prompts_file, monkeypatch):
    """The chunked head applies the output embedding alone, so a model with logit soft-capping
    (Gemma-2/3) would train on other log-probs than it samples from: refused with a fix."""
    from dynalm.models import policy

    real = policy.load_causal_lm

    def soft_capped(*a, **k):
        lm, tok = real(*a, **k)
        lm.config.final_logit_softcapping = 30.0
        return lm, tok

    monkeypatch.setattr(policy, "load_causal_lm", soft_capped)
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, train={"logits_chunk": 2}))
    with pytest.raises(UserError) as err:
        policy.PolicyValueModel.from_config(cfg)
    assert err.value.line() == ("train.logits_chunk cannot be used with model_type llama: it transforms its logits "
                                "(final_logit_softcapping) (set train.logits_chunk=0)")
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, train={"logits_chunk": 0}))
    assert policy.PolicyValueModel.from_config(cfg).logits_chunk == 0
