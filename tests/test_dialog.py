"""The multi-turn dialog environment: rollout layout and masks, turn rewards, gradient
isolation of the user's tokens, GAE over masked gaps, and training through the CLI."""

import json

import pytest
import torch

from dynalm.cli import main
from dynalm.config import build_config
from dynalm.envs import DialogEnv
from dynalm.errors import UserError
from dynalm.models.policy import PolicyValueModel
from dynalm.rewards import dialog as dr
from dynalm.rl import advantages as A
from dynalm.rl import losses
from dynalm.rl.episodes import rollout
from dynalm.rl.objectives import add_token_rewards, shape_batch
from dynalm.rl.trainer import seed_everything

from conftest import tiny_overrides

ROWS = [
    {"persona": "a happy king", "goal": "a red bird", "opening": "the cat sat on the mat"},
    {"persona": "a sad queen", "goal": "a big tree", "opening": "once upon a time"},
    {"persona": "a small dog", "goal": "the moon", "opening": "saw a river"},
]


@pytest.fixture()
def dialog_rows(tmp_path):
    p = tmp_path / "dialog.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


@pytest.fixture()
def turn_reward_file(tmp_path):
    """A user's turn reward: the 1-based turn number, so each turn's score is recognisable."""
    p = tmp_path / "turn_reward.py"
    p.write_text("def turn_no(prompts, completions, turn, **kwargs):\n    return [t + 1.0 for t in turn]\n")
    return p


def _setup(model_dir, rows_file, reward_file, algo="ppo", turns=3, **extra):
    over = dict(
        data={"prompt_field": "opening"},
        env={"kind": "dialog", "turns": turns, "turn_gamma": 0.9, "user_generation": {"max_new_tokens": 4}},
        generation={"max_new_tokens": 5},
        rewards=[{"name": f"{reward_file}:turn_no"}],
        algorithm={"name": algo, "num_generations": 2 if algo in ("grpo", "rloo") else 1},
        kl={"coef": 0.0},
    )
    over.update(extra)
    cfg = build_config(tiny_overrides(model_dir, rows_file, **over))
    seed_everything(0)
    model = PolicyValueModel.from_config(cfg)
    return cfg, model, DialogEnv(cfg, model)


def _rollout(cfg, model, env, n=None, seed=0):
    rows = ROWS[:n] if n else ROWS
    if cfg.algorithm.num_generations > 1:
        rows = [r for r in rows for _ in range(cfg.algorithm.num_generations)]
    group = [i // cfg.algorithm.num_generations for i in range(len(rows))]
    batch, _, info = rollout(model, env, rows, group, cfg.generation, max_prompt_tokens=cfg.model.max_prompt_tokens,
                             generator=torch.Generator().manual_seed(seed), training=True)
    return batch, info


def _runs(row_ids):
    """Contiguous runs of equal turn ids, e.g. [0,0,-1,1] -> [(0,0,1), (-1,2,2), (1,3,3)]."""
    out, start = [], 0
    for j in range(1, len(row_ids) + 1):
        if j == len(row_ids) or row_ids[j] != row_ids[start]:
            out.append((row_ids[start], start, j - 1))
            start = j
    return out


# ----------------------------------------------------------------------------- text interface


def test_reset_step_and_user_prompt(tiny_llama, dialog_rows, turn_reward_file):
    cfg, model, env = _setup(tiny_llama, dialog_rows, turn_reward_file, turns=2)
    s0 = env.reset(ROWS[0])
    assert s0.messages == [{"role": "user", "content": "the cat sat on the mat"}]
    assert "king" not in env.render(s0)  # the assistant never sees the persona or the goal
    up = env.user_prompt(s0, "the dog ran", model.tokenizer)
    assert "a happy king" in up and "a red bird" in up and up.rstrip().endswith("User:")
    s1, terms, done = env.step(s0, "the dog ran", generator=torch.Generator().manual_seed(0))
    assert [m["role"] for m in s1.messages] == ["user", "assistant", "user"] and s1.turn == 1
    assert terms == {"turn_no": 1.0, "score": 1.0} and not done
    s2, terms, done = env.step(s1, "a bird", generator=torch.Generator().manual_seed(0))
    assert terms["turn_no"] == 2.0 and done


def test_chat_template_glue(tiny_llama, dialog_rows, turn_reward_file):
    cfg, model, env = _setup(tiny_llama, dialog_rows, turn_reward_file, turns=2)
    tok = model.tokenizer
    tok.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}"
    )
    s0 = env.reset(ROWS[0])
    assert env.render(s0) == "<s> user the cat sat on the mat </s> <s> assistant "
    # The assistant's EOS already closed its message; a reply cut at the token limit gets it here.
    assert env.glue_text(s0, "yes", last_token=tok.eos_token_id) == " <s> user yes </s> <s> assistant "
    assert env.glue_text(s0, "yes", last_token=None) == " </s> <s> user yes </s> <s> assistant "
    # Issue 12.8: a model with two stop ids (EOS and another from generation_config) that
    # stopped on the other one has not closed its message: the template's marker stays.
    other = tok.unk_token_id
    assert other != tok.eos_token_id
    assert env.glue_text(s0, "yes", last_token=other) == " </s> <s> user yes </s> <s> assistant "
    # The simulator plays the user: roles swapped, persona and goal in its system message.
    up = env.user_prompt(s0, "a dog", tok)
    assert up.startswith("<s> system You are role-playing") and "a happy king" in up
    assert "<s> assistant the cat sat on the mat </s> <s> user a dog </s> <s> assistant " in up
    batch, _ = _rollout(cfg, model, env, n=2)
    full = model(batch.input_ids, batch.attention_mask, batch.n_actions)
    assert torch.allclose(full.logprobs * batch.action_mask, batch.logprobs, atol=1e-5)


# ----------------------------------------------------------------------------- rollout layout


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_rollout_layout_masks_and_turn_rewards(fixture, request, dialog_rows, turn_reward_file):
    cfg, model, env = _setup(request.getfixturevalue(fixture), dialog_rows, turn_reward_file)
    with torch.no_grad():
        model.value_head.weight.normal_()
    batch, info = _rollout(cfg, model, env)
    K, B, T = 3, len(ROWS), batch.n_actions
    m, tid = batch.action_mask, batch.turn_ids
    assert batch.input_ids.shape[0] == B and m.shape == tid.shape == (B, T)
    assert torch.equal(m, (tid >= 0).float())  # assistant tokens 1; user, template and padding 0
    tok = model.tokenizer
    for i in range(B):
        n = int(batch.attention_mask[i, -T:].sum())
        assert batch.attention_mask[i, -T:][:n].all() and not batch.attention_mask[i, -T:][n:].any()  # no holes
        runs = _runs(tid[i, :n].tolist())
        assert [r[0] for r in runs] == [0, -1, 1, -1, 2]  # a1 | user 2 | a2 | user 3 | a3
        tr = batch.extras["transcript"][i]
        assert [t["role"] for t in tr] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
        for (_, s, e), user_msg in zip(runs[1::2], [tr[2], tr[4]]):
            glue = tok.decode(batch.input_ids[i, -T:][s : e + 1].tolist())
            assert user_msg["content"] in glue  # the gap holds the simulated user's turn
        for k, (_, s, e) in enumerate(runs[0::2]):
            assert batch.turn_scores[i, e] == k + 1  # each turn's reward on its last token
            assert tr[2 * k + 1]["reward"] == k + 1
        assert int((batch.turn_scores[i] != 0).sum()) == K
    assert torch.equal(batch.scores, torch.full((B,), 6.0))  # episode total: 1 + 2 + 3
    assert info["reward/turn_2"] == 2.0
    # log-probs and values recorded turn by turn (KV cache) equal one forward over the conversation
    full = model(batch.input_ids, batch.attention_mask, T)
    assert torch.allclose(full.logprobs * m, batch.logprobs, atol=1e-5)
    assert torch.allclose(full.values * m, batch.values, atol=1e-5)
    # KL and fluency live on assistant tokens only; the turn rewards sit where the env put them
    batch.ref_logprobs = model.reference_logprobs(batch.input_ids, batch.attention_mask, T)
    add_token_rewards(batch, 0.5, algorithm=cfg.algorithm, kl=cfg.kl, fluency_coef=0.1, max_new_tokens=cfg.generation.max_new_tokens)
    assert torch.all(batch.rewards[m == 0] == 0)
    kl = batch.logprobs - batch.ref_logprobs
    expect = (-0.5 * kl + 0.1 * batch.ref_logprobs) * m + batch.turn_scores
    assert torch.allclose(batch.rewards, expect, atol=1e-6)


def test_separate_user_model(tiny_llama, tiny_gpt2, dialog_rows, turn_reward_file):
    cfg, model, env = _setup(tiny_llama, dialog_rows, turn_reward_file, turns=2)
    cfg = cfg.model_copy(update={"env": cfg.env.model_copy(update={"user_model": str(tiny_gpt2)})})
    env = DialogEnv(cfg, model)
    assert env._user is not None and env._user is not model and not any(p.requires_grad for p in env._user.parameters())
    assert DialogEnv(cfg, model)._user is env._user  # loaded once per process and device
    batch, _ = _rollout(cfg, model, env, n=2)
    assert [t["role"] for t in batch.extras["transcript"][0]] == ["user", "assistant", "user", "assistant", "user"]


@pytest.mark.parametrize("algo", ["a2c", "ppo", "grpo", "rloo"])
def test_trainer_step_every_algorithm(algo, tiny_llama, dialog_rows, turn_reward_file):
    from dynalm.rl.trainer import Trainer

    # + reply length, which varies within a group (grpo/rloo learn nothing from equal scores)
    rewards = [{"name": f"{turn_reward_file}:turn_no"}, {"name": "length", "weight": 0.1}]
    cfg, model, env = _setup(tiny_llama, dialog_rows, turn_reward_file, algo=algo, turns=2, rewards=rewards)
    trainer = Trainer(cfg, model, ROWS, env)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res = trainer.step()
    m = res.metrics
    assert m["reward/turn_no"] == 3.0 and m["reward/turn_1"] >= 1.0 and m["reward/turn_2"] >= 2.0
    assert "episode/turn_eos_rate" in m and "time/user" in m
    b = res.batch
    assert torch.all(b.advantages[b.action_mask == 0] == 0) and torch.all(b.rewards[b.action_mask == 0] == 0)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- gradient isolation


def _loss(model, batch, cfg, beta):
    """The update's loss (ppo: clipped policy + value, entropy bonus; grpo: + β·KL), as in trainer.update."""
    a = cfg.algorithm
    out = model(batch.input_ids, batch.attention_mask, batch.n_actions)
    m = batch.action_mask
    loss, _ = losses.ppo_policy_loss(out.logprobs, batch.logprobs, batch.advantages, m, a.clip_range)
    if out.values is not None:
        if out.values.requires_grad:
            out.values.retain_grad()
        vl, _ = losses.clipped_value_loss(out.values, batch.values, batch.returns, m, a.clip_range_value)
        loss = loss + a.vf_coef * vl
    loss = loss - 0.01 * losses.entropy_bonus(out.entropy, m)
    if a.name == "grpo":
        loss = loss + beta * A.masked_mean(losses.kl_penalty(out.logprobs, batch.ref_logprobs, "k3"), m)
    return loss, out


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_user_tokens_get_exactly_zero_gradient(algo, tiny_llama, dialog_rows, turn_reward_file):
    cfg, model, env = _setup(tiny_llama, dialog_rows, turn_reward_file, algo=algo, kl={"coef": 0.1})
    batch, _ = _rollout(cfg, model, env, n=2)
    T = batch.n_actions
    batch.ref_logprobs = model.reference_logprobs(batch.input_ids, batch.attention_mask, T)
    shape_batch(batch, cfg, 0.1)
    m = batch.action_mask
    assert torch.all(batch.advantages[m == 0] == 0)
    if algo == "grpo":  # one advantage per episode, on its assistant tokens
        for i in range(len(batch)):
            assert batch.advantages[i][m[i] > 0].unique().numel() == 1

    kept = {}

    def keep_logits(mod, inp, out):
        out.logits.retain_grad()
        kept["logits"] = out.logits

    hook = model.lm.register_forward_hook(keep_logits)
    try:
        loss, out = _loss(model, batch, cfg, 0.1)
        loss.backward()
    finally:
        hook.remove()
    g = kept["logits"].grad[:, :-1]  # position j predicts region token j
    user = (m == 0) & (batch.attention_mask[:, -T:] > 0)
    assert user.any() and (m > 0).any()
    assert torch.all(g[user] == 0), "a user-turn token got a gradient"
    assert g[m > 0].abs().sum() > 0
    if out.values is not None:
        assert torch.all(out.values.grad[m == 0] == 0) and out.values.grad[m > 0].abs().sum() > 0

    # junk in the user positions of the advantages, returns and rewards changes nothing
    junk = batch.rows(torch.arange(len(batch)))
    noise = torch.randn(junk.advantages.shape, generator=torch.Generator().manual_seed(0)) * 100 * (1 - m)
    junk.advantages = junk.advantages + noise
    junk.returns = junk.returns + noise
    junk.rewards = junk.rewards + noise
    with torch.no_grad():
        assert torch.equal(_loss(model, batch, cfg, 0.1)[0], _loss(model, junk, cfg, 0.1)[0])


# ----------------------------------------------------------------------------- advantages over gaps


def test_gae_and_td0_skip_gaps_hand_values():
    # assistant, assistant | user, user | assistant | padding;  γ = 0.9, λ = 0.5
    r = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]])
    v = torch.tensor([[0.5, 0.4, 7.0, 7.0, 0.2, 7.0]])  # junk values on the gap and the padding
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    adv, ret = A.gae(r, v, m, 0.9, 0.5)
    # δ4 = 2 − .2 = 1.8 (terminal); δ1 = 1 + .9·.2 − .4 = .78 (next value: the first token after the gap)
    # δ0 = .9·.4 − .5 = −.14;  A4 = 1.8, A1 = .78 + .45·1.8 = 1.59, A0 = −.14 + .45·1.59 = .5755
    assert torch.allclose(adv, torch.tensor([[0.5755, 1.59, 0.0, 0.0, 1.8, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[1.0755, 1.99, 0.0, 0.0, 2.0, 0.0]]))
    adv, tgt = A.td0(r, v, m, 0.9)
    assert torch.allclose(adv, torch.tensor([[-0.14, 0.78, 0.0, 0.0, 1.8, 0.0]]))
    assert torch.allclose(tgt, torch.tensor([[0.36, 1.18, 0.0, 0.0, 2.0, 0.0]]))
    # turn_gamma .5 between the turns: γ_1 = .5 → δ1 = 1 + .5·.2 − .4 = .7, A1 = .7 + .25·1.8 = 1.15,
    # A0 = −.14 + .45·1.15 = .3775
    gam = A.turn_discounts(torch.tensor([[0, 0, -1, -1, 1, -1]]), m, 0.9, 0.5)
    assert torch.allclose(gam, torch.tensor([[0.9, 0.5, 0.9, 0.9, 0.9, 0.9]]))
    adv, _ = A.gae(r, v, m, gam, 0.5)
    assert torch.allclose(adv, torch.tensor([[0.3775, 1.15, 0.0, 0.0, 1.8, 0.0]]))


def test_gaps_equal_the_compacted_sequence():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        T = 12
        m = (torch.rand(3, T, generator=g) > 0.4).float()
        r, v = torch.randn(3, T, generator=g) * m, torch.randn(3, T, generator=g)
        adv, ret = A.gae(r, v, m, 0.9, 0.7)
        tadv, _ = A.td0(r, v, m, 0.9)
        for i in range(3):
            keep = m[i] > 0
            n = int(keep.sum())
            ca, cr = A.gae(r[i, keep][None], v[i, keep][None], torch.ones(1, n), 0.9, 0.7)
            assert torch.allclose(adv[i, keep], ca[0], atol=1e-6) and torch.allclose(ret[i, keep], cr[0], atol=1e-6)
            assert torch.allclose(tadv[i, keep], A.td0(r[i, keep][None], v[i, keep][None], torch.ones(1, n), 0.9)[0][0], atol=1e-6)
            assert torch.all(adv[i, ~keep] == 0)


# ----------------------------------------------------------------------------- reward functions


def test_turn_reward_functions():
    u = ["Could you tell me more about the watering schedule for tomatoes please?", "ok", ""]
    eng = dr.engagement(["x"] * 3, ["y"] * 3, user_reply=u)
    assert eng == [1.0, pytest.approx(0.5 / 12), 0.0]  # 0.5·question + 0.5·min(1, words/12)
    sent = dr.user_sentiment(["x"] * 2, ["y"] * 2, user_reply=["Thank you, that is wonderful!", "This is awful."])
    assert sent[0] > 0.5 and sent[1] < -0.3
    rep = dr.turn_repetition(
        ["x"] * 3, ["water them every morning", "water them every morning now", "hello"],
        assistant_history=[[], ["please water them every morning"], ["water them"]],
    )
    assert rep == [0.0, pytest.approx(2 / 3), 0.0]
    with pytest.raises(UserError, match="needs the dialog environment"):
        dr.user_sentiment(["x"], ["y"])
    with pytest.raises(UserError, match="needs env.kind: dialog"):
        build_config({"rewards": [{"name": "engagement"}]})


def test_relevance_is_minilm_cosine():
    rel = dr.relevance(["How do I keep tomato plants alive in the heat?"] * 2,
                       ["Water tomatoes deeply in the early morning and add mulch.", "The stock market closed higher."])
    assert rel[0] > rel[1] + 0.2


GOAL = "You want healthy breakfasts you can eat in under five minutes."
HELPFUL = ("Try overnight oats: mix oats, milk and berries the night before, and grab the jar in the morning.",
           "Thanks! Overnight oats sound quick. Can I make them the night before?")
GUSHING = ("What a wonderful question! You are amazing, and I love how much you care about yourself!",
           "Aww, you're so sweet! I love talking to you, you're wonderful!")


def test_flattery_no_longer_pays_once_sentiment_must_stay_on_the_goal():
    """Issue 20: the dialog preset learned to gush at a simulated user who gushed back."""
    replies, users = [HELPFUL[0], GUSHING[0]], [HELPFUL[1], GUSHING[1]]
    kw = dict(user_reply=users, goal=[GOAL] * 2)
    old = dr.user_sentiment(["x"] * 2, replies, **kw)
    assert old[1] > old[0]  # plain sentiment pays the gushing exchange more
    new = dr.user_sentiment(["x"] * 2, replies, on_goal=0.4, **kw)
    assert new[0] == pytest.approx(old[0])  # on goal (cos 0.43 ≥ 0.4): paid in full
    assert new[1] == 0.0  # the gush is off the goal (cos 0.05 ≤ 0.2): nothing
    goal = dr.goal_relevance(["x"] * 2, replies, **kw)
    assert goal[0] > goal[1] + 0.3
    # between t/2 and t the gate is linear; negative sentiment is never excused
    c = dr.goal_relevance(["x"], ["y"], user_reply=["That doesn't help, I only have three minutes."], goal=[GOAL])[0]
    neg = dr.user_sentiment(["x"], ["y"], on_goal=0.9, user_reply=["That doesn't help, I only have three minutes."], goal=[GOAL])
    assert c < 0.45 and neg == dr.user_sentiment(["x"], ["y"], user_reply=["That doesn't help, I only have three minutes."])
    with pytest.raises(UserError, match="needs a 'goal' field in every data row"):
        dr.goal_relevance(["x"], ["y"], user_reply=["hi"])
    with pytest.raises(UserError, match=r"on_goal must lie in \(0, 1\], not 1.5"):
        dr.user_sentiment(["x"], ["y"], on_goal=1.5, user_reply=["hi"], goal=[GOAL])
    with pytest.raises(UserError, match="needs env.kind: dialog"):
        build_config({"rewards": [{"name": "goal_relevance"}]})


def test_on_goal_gate_is_linear_between_half_and_full_threshold():
    kw = dict(user_reply=[HELPFUL[1]], goal=[GOAL])
    c = dr.goal_relevance(["x"], ["y"], **kw)[0]
    s = dr.user_sentiment(["x"], ["y"], **kw)[0]
    t = c / 0.75  # cos sits at 3/4 of t, i.e. halfway between t/2 and t
    assert dr.user_sentiment(["x"], ["y"], on_goal=t, **kw)[0] == pytest.approx(0.5 * s, abs=1e-6)


def test_batch_repetition_counts_ngrams_shared_with_other_replies():
    stock = "what a wonderful question you have"
    out = dr.batch_repetition(["x"] * 3, [stock + " about oats", stock + " about tea", "boil an egg for six minutes"])
    # trigrams: 6 each for the first two, 5 of them shared ("what a wonderful" … "you have about")
    assert out == [pytest.approx(5 / 6), pytest.approx(5 / 6), 0.0]
    assert dr.batch_repetition(["x"], ["a reply repeats a reply repeats"]) == [0.0]  # only other replies count
    assert dr.batch_repetition(["x"] * 2, ["hi", "hi"]) == [0.0, 0.0]  # no trigram at all


# ----------------------------------------------------------------------------- training through the CLI


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_dialog_preset_trains_through_cli(algo, tiny_llama, tmp_path, capsys):
    import yaml

    run = tmp_path / algo
    config = "configs/dialog.yaml"
    terms = {"user_sentiment", "goal_relevance", "engagement", "relevance", "turn_repetition", "batch_repetition", "eos",
             "user_sentiment_plain"}
    if algo == "grpo":  # the preset less its MiniLM terms (slow on a busy CPU); ppo runs it whole
        raw = yaml.safe_load(open(config))
        raw["rewards"] = [r for r in raw["rewards"] if r["name"] not in ("relevance", "goal_relevance")]
        for r in raw["rewards"]:
            r.pop("kwargs", None)
        config, terms = tmp_path / "dialog-grpo.yaml", terms - {"relevance", "goal_relevance"}
        config.write_text(yaml.safe_dump(raw))
    argv = ["train", "-c", str(config), "--out", str(run),
            "--set", f"model.name={tiny_llama}", "--set", "model.lora.r=2", "--set", f"algorithm.name={algo}",
            "--set", "algorithm.num_generations=2", "--set", "train.steps=2", "--set", "train.batch_size=4",
            "--set", "generation.max_new_tokens=4", "--set", "env.turns=2", "--set", "env.user_generation.max_new_tokens=4",
            "--set", "eval.max_prompts=2", "--set", "env.transcripts=2", "--set", "log.samples_every=1",
            "--set", "log.progress=false", "--set", "log.tensorboard=false"]
    assert main(argv) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ["reward", "reward/turn_1", "reward/turn_2", "episode/turn_eos_rate", "kl"] + [f"reward/{t}" for t in terms]:
        assert key in metrics[-1]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert samples and samples[0]["completion"].startswith("user: ") and "\nassistant: " in samples[0]["completion"]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_prompts"] == 2 and ev["trained"]["turns"] == 2
    for key in ["reward", "reward/user_sentiment", "reward/turn_1", "kl", "distinct2", "mean_length", "eos_rate"]:
        assert key in ev["trained"] and key in ev["base"]
    lines = [json.loads(x) for x in (run / "transcripts.jsonl").read_text().splitlines()]
    assert [(t["side"], t["episode"]) for t in lines] == [("base", 0), ("base", 1), ("trained", 0), ("trained", 1)]
    tr = lines[-1]["turns"]
    assert [t["role"] for t in tr] == ["user", "assistant", "user", "assistant", "user"]
    assert set(tr[1]["terms"]) == terms
    assert lines[-1]["persona"] and (run / "report.md").is_file() and (run / "tokens.html").is_file()
    if algo == "ppo":  # `dynalm eval --run` writes the conversations behind its numbers too
        (run / "transcripts.jsonl").unlink()
        assert main(["eval", "--run", str(run), "--set", "eval.max_prompts=1"]) == 0
        again = [json.loads(x) for x in (run / "transcripts.jsonl").read_text().splitlines()]
        assert [(t["side"], t["episode"]) for t in again] == [("base", 0), ("trained", 0)]
        # with --out, an eval under other settings goes there alone: the run's eval, transcripts and
        # report stay byte for byte (it used to overwrite them, so that a benchmark read imagined replies
        # back as the real environment's)
        kept = {n: (run / n).read_bytes() for n in ("eval.json", "transcripts.jsonl", "report.md")}
        out = tmp_path / "other" / "ev.json"
        assert main(["eval", "--run", str(run), "--set", "eval.max_prompts=2", "--out", str(out)]) == 0
        assert {n: (run / n).read_bytes() for n in kept} == kept
        assert json.loads(out.read_text())["n_prompts"] == 2
        beside = [json.loads(x) for x in (tmp_path / "other" / "ev.transcripts.jsonl").read_text().splitlines()]
        assert [(t["side"], t["episode"]) for t in beside] == [("base", 0), ("base", 1), ("trained", 0), ("trained", 1)]


def test_turn_level_best_of_n_picks_the_best_lookahead(tiny_llama, dialog_rows, tmp_path):
    """Planning in a dialog: each turn keeps the candidate whose simulated user reply scored best."""
    from dynalm.planning.dialog import plan_dialog

    rf = tmp_path / "len_reward.py"
    rf.write_text("def reply_len(prompts, completions, **kw):\n    return [float(len(c.split())) for c in completions]\n")
    cfg, model, env = _setup(tiny_llama, dialog_rows, rf, turns=2, rewards=[{"name": f"{rf}:reply_len"}])
    res = plan_dialog(model, env, ROWS[:2], n=3, generator=torch.Generator().manual_seed(0))
    assert res.reward_calls == 2 * 2 * 3  # episodes × turns × candidates
    for ep, (cands, tr) in enumerate(zip(res.candidate_scores, res.transcripts)):
        assert [len(c) for c in cands] == [3, 3]
        chosen = [t for t in tr if t["role"] == "assistant"]
        assert [t["score"] for t in chosen] == [max(c) for c in cands]
        assert [t["score"] for t in chosen] == [float(len(t["content"].split())) for t in chosen]
        assert res.totals[ep] == sum(max(c) for c in cands)
        assert [t["role"] for t in tr] == ["user", "assistant", "user", "assistant", "user"]
    # eval with the planner goes through the same path
    from dynalm.evaluate import evaluate

    cfg2 = cfg.model_copy(update={"planner": cfg.planner.model_copy(update={"n": 2})})
    ev = evaluate(model, ROWS, cfg2, base=False, planner="best-of-n")
    assert ev["trained"]["planner"] == "best-of-n" and ev["trained"]["reward_calls"] == 3 * 2 * 2
    with pytest.raises(UserError, match="planner 'mcts' is not available for env.kind dialog"):
        evaluate(model, ROWS, cfg2, base=False, planner="mcts")
