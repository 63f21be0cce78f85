"""The learned environment model (issue 15, items 2-3): data, NLL maths, training, the model as an environment."""

import json

import pytest
import torch
import yaml

from dynalm.cli import main
from dynalm.envmodel.data import environment_view, observation_text, openings, parse_observation, split_by_episode

from conftest import tiny_overrides

ECHO_ENV = '''
class Echo:
    """Three turns; the env answers 'yes the cat' when the action says 'cat', else 'no the dog'."""

    def reset(self, seed=None, options=None):
        self.t = 0
        return "once upon a time", {}

    def step(self, action):
        self.t += 1
        hit = "cat" in action.split()
        return ("yes the cat" if hit else "no the dog"), float(hit), self.t >= 3, False, {"success": hit}


def make_env(**kwargs):
    return Echo()
'''

U = lambda c: {"role": "user", "content": c}  # noqa: E731
A = lambda c: {"role": "assistant", "content": c}  # noqa: E731


def test_observations_as_text_and_back():
    assert observation_text([U("higher")]) == "higher"
    msgs = [{"role": "tool", "content": "42"}, U("and now?")]
    assert observation_text(msgs) == "[tool] 42\n[user] and now?"
    assert parse_observation(observation_text(msgs)) == msgs
    assert parse_observation("plain reply") == [U("plain reply")]
    assert parse_observation("lead\n[tool] x") == [U("lead"), {"role": "tool", "content": "x"}]
    # a bracketed word is text, not a role; the agent's role is never the environment's
    assert parse_observation("[sighs] fine, go on") == [U("[sighs] fine, go on")]
    assert parse_observation("ok\n[assistant] hi") == [U("ok\n[assistant] hi")]


def test_the_environment_sees_the_conversation_with_roles_swapped():
    state = [U("hi"), A("hello"), {"role": "tool", "content": "7"}, U("ok")]
    assert environment_view(state, "bye") == [
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "[tool] 7\n[user] ok"}, {"role": "user", "content": "bye"},
    ]


def test_held_out_episodes_are_whole_and_openings_distinct():
    rows = [{"episode": f"e{e}", "turn": t, "state": [U(f"open {e % 3}")]} for e in range(10) for t in range(3)]
    train, held = split_by_episode(rows, 0.2, seed=0)
    assert len(held) == 2 * 3 and len(train) == 8 * 3
    assert not {r["episode"] for r in train} & {r["episode"] for r in held}
    assert split_by_episode(rows, 0.2, seed=0) == (train, held)
    assert openings(rows) == [[U("open 0")], [U("open 1")], [U("open 2")]]


def _em(tiny_llama):
    from dynalm.envmodel import EnvModel, EnvModelConfig

    return EnvModel.build(EnvModelConfig(model=str(tiny_llama), data="-", lora_r=4, lora_alpha=8, max_observation_tokens=8))


def test_observation_nll_and_heads_match_a_full_forward_by_hand(tiny_llama):
    model = _em(tiny_llama)
    with torch.no_grad():  # a non-zero adapter, so the trained and the base model differ
        for n, p in model.lm.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    rows = [{"state": [U("the cat")], "action": "sat on", "next_observation": [U("yes the dog")], "reward": 1.0, "terminated": False},
            {"state": [U("a king")], "action": "ran", "next_observation": None, "reward": -1.0, "terminated": True}]
    out = model.forward_rows(rows)
    base = model.forward_rows(rows, base=True)
    tok = model.tokenizer
    for i, r in enumerate(rows):
        prompt = model._prompt_ids(r["state"], r["action"])
        tgt = model.target_ids(r["next_observation"])
        seq = torch.tensor([prompt + tgt])
        for lm, res in ((model.lm.lm, out), (None, base)):
            if lm is None:
                with model.lm.reference() as ref, torch.no_grad():
                    o = ref(input_ids=seq, output_hidden_states=True)
            else:
                with torch.no_grad():
                    o = lm(input_ids=seq, output_hidden_states=True)
            logp = torch.log_softmax(o.logits[0].float(), -1)
            want = -sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(tgt))
            assert float(res["nll"][i]) == pytest.approx(want, abs=1e-4) and int(res["tokens"][i]) == len(tgt)
            if lm is not None:
                h = o.hidden_states[-1][0]
                assert float(res["done_logit"][i]) == pytest.approx(float(model.done_head(h[len(prompt) - 1])), abs=1e-5)
                assert float(res["reward_z"][i]) == pytest.approx(float(model.reward_head(h[-1])), abs=1e-5)
    assert tgt == [] and model.target_ids([U("yes the dog")])[-1] == tok.eos_token_id  # the end-of-turn token is a target
    assert float(out["nll"][0]) != pytest.approx(float(base["nll"][0]), abs=1e-3)


def test_imagined_observations_stop_at_the_longest_real_one(tiny_llama, monkeypatch):
    import dynalm.envmodel.network as net

    model = _em(tiny_llama)
    budgets = []
    real_sample = net.sample

    def spy(lm, ids, mask, gen, **kw):
        out = real_sample(lm, ids, mask, gen, **kw)
        budgets.append((gen.max_new_tokens, out[0].shape[1] - ids.shape[1]))
        return out

    monkeypatch.setattr(net, "sample", spy)
    states, actions = [[U("the cat")], [U("a king")]], ["sat on", "ran"]
    model.done_head.bias.data.fill_(-10.0)  # never ends: every row writes an observation
    assert model.longest_observation is None and model.observation_budget() == model.cfg.max_observation_tokens
    rows = [{"next_observation": [U("yes the dog")]}, {"next_observation": [U("no")]}, {"next_observation": None}]
    model.note_observations(rows)
    longest = len(model.target_ids([U("yes the dog")]))
    assert 2 <= longest < model.cfg.max_observation_tokens and model.longest_observation == longest
    model.note_observations([{"next_observation": [U("no")]}])  # a shorter one does not lower it
    assert model.longest_observation == longest and model.observation_budget() == longest
    capped, _, _ = model.step(states, actions, generator=torch.Generator().manual_seed(3))
    model.cfg.cap_to_longest_seen = False
    free, _, _ = model.step(states, actions, generator=torch.Generator().manual_seed(3))
    assert budgets == [(longest, longest), (model.cfg.max_observation_tokens, model.cfg.max_observation_tokens)]
    # the cap only cuts: the same draws, stopped earlier (the random model writes no end of turn)
    for c, f in zip(capped, free):
        assert f[0]["content"].startswith(c[0]["content"]) and len(f[0]["content"]) > len(c[0]["content"])


@pytest.fixture()
def echo_run(tiny_llama, prompts_file, tmp_path):
    (tmp_path / "echo_env.py").write_text(ECHO_ENV)
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                          eval={"max_prompts": 4, "batch_size": 4}, train={"steps": 3})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{tmp_path / 'echo_env.py'}:make_env", "max_turns": 4, "record_transitions": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    return tmp_path / "run", over


def test_train_env_model_learns_the_observations_saves_and_runs_as_an_environment(echo_run, tiny_llama, tmp_path, capsys):
    run, over = echo_run
    em = tmp_path / "em"
    args = ["train-env-model", "--data", str(run), "--out", str(em), "--model", str(tiny_llama),
            "--set", "epochs=4", "--set", "learning_rate=3e-3", "--set", "lora_r=4", "--set", "lora_alpha=8"]
    assert main(args) == 0
    assert "held-out next-observation NLL" in capsys.readouterr().out
    meta = json.loads((em / "env_model.json").read_text())
    assert sorted(p.name for p in em.iterdir()) == ["env_model.json", "env_model.safetensors", "manifest.json"]
    m = meta["metrics"]
    assert m["train_episodes"] + m["eval_episodes"] == len({json.loads(x)["episode"] for x in (run / "transitions.jsonl").open()})
    # "yes the cat" / "no the dog" are easy to learn: the held-out NLL falls far below the prompted base model's
    assert m["trained"]["nll_per_token"] < 0.5 * m["prompted_base"]["nll_per_token"]
    assert meta["openings"] == [[{"role": "user", "content": "once upon a time"}]]
    from dynalm.envmodel.train import load_env_model

    loaded = load_env_model(em)[0]
    assert meta["longest_observation"] == loaded.longest_observation == max(
        len(loaded.target_ids(o)) for o in ([U("yes the cat")], [U("no the dog")]))
    # the learned model as an environment: a run inside it, transitions marked imagined
    over["env"] = {"kind": "model", "path": str(em), "max_turns": 3, "record_transitions": True}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "run2")]) == 0
    ls = [json.loads(x) for x in (tmp_path / "run2" / "transitions.jsonl").open()]
    train = [t for t in ls if t["source"] == "train"]
    assert train and all(t["info"] == {"imagined": True} for t in train)
    assert all(t["state"][0] == {"role": "user", "content": "once upon a time"} for t in train)
    assert json.loads((tmp_path / "run2" / "eval.json").read_text())["trained"]["reward"] is not None
    # planning with it in the real environment: one real step per turn, the candidates imagined
    assert main(["eval", "--run", str(run), "--planner", "lookahead", "--set", f"planner.env_model={em}", "--set", "planner.n=2",
                 "--set", "planner.depth=2"]) == 0
    # best-of-n inside the model: a fork of the model env is a model env
    assert main(["eval", "--run", str(tmp_path / "run2"), "--planner", "best-of-n", "--set", "planner.n=2"]) == 0
    la = json.loads((run / "eval-lookahead.json").read_text())["trained"]
    assert la["planner"] == "lookahead" and la["env_steps"] == sum(sum(t["role"] == "assistant" for t in s["turns"]) for s in la["samples"])
    assert la["imagined_steps"] >= 2 * la["env_steps"]
    assert _err(capsys, ["eval", "--run", str(run), "--planner", "lookahead"]) == (
        "dynalm: error: planner 'lookahead' imagines with a learned environment model: planner.env_model is not set "
        "(train one with `dynalm train-env-model` and pass --set planner.env_model=DIR)")


def _err(capsys, args) -> str:
    assert main(args) == 2
    return capsys.readouterr().err.strip()


def test_bad_inputs_are_one_line(tmp_path, capsys, tiny_llama):
    out = str(tmp_path / "em")
    assert _err(capsys, ["train-env-model", "--data", str(tmp_path / "nope.jsonl"), "--out", out]) == (
        f"dynalm: error: transitions file '{tmp_path / 'nope.jsonl'}' not found "
        "(record one with --set env.record_transitions=true, or check the path)")
    (tmp_path / "empty.jsonl").write_text("")
    assert _err(capsys, ["train-env-model", "--data", str(tmp_path / "empty.jsonl"), "--out", out]) == (
        f"dynalm: error: transitions file '{tmp_path / 'empty.jsonl'}' is empty "
        "(train or evaluate with env.record_transitions: true first)")
    (tmp_path / "bad.jsonl").write_text('{"episode": "e", "state": [], "action": "a"}\n')
    assert _err(capsys, ["train-env-model", "--data", str(tmp_path / "bad.jsonl"), "--out", out]) == (
        f"dynalm: error: {tmp_path / 'bad.jsonl'}: line 1 has no field 'next_observation' "
        "(give transitions.jsonl written with env.record_transitions: true)")
    assert not (tmp_path / "em").exists()
    (tmp_path / "notem").mkdir()
    (tmp_path / "p.jsonl").write_text('{"prompt": "the cat"}\n')
    over = tiny_overrides(tiny_llama, tmp_path / "p.jsonl")
    over.pop("rewards")
    over["env"] = {"kind": "model", "path": str(tmp_path / "notem")}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(over))
    assert _err(capsys, ["train", "-c", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "r")]) == (
        f"dynalm: error: '{tmp_path / 'notem'}' is not an environment model (needs env_model.json and env_model.safetensors) "
        "(train one with `dynalm train-env-model --data RUN/transitions.jsonl --out DIR` and give that folder)")
    assert "env.kind model needs env.path" in _err(capsys, ["config", "--set", "env.kind=model"])


def _dyna_cfg(tiny_llama, prompts_file, tmp_path, steps):
    from dynalm.config import build_config

    (tmp_path / "echo_env.py").write_text(ECHO_ENV)
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2}, train={"steps": steps},
                          eval={"enabled": False}, log={"checkpoint_every": 1})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{tmp_path / 'echo_env.py'}:make_env", "max_turns": 4, "record_transitions": True}
    over["dyna"] = {"enabled": True, "env_model": "online", "imagined_fraction": 0.5, "warmup_steps": 1, "env_model_base": str(tiny_llama),
                    "env_model_learning_rate": 3e-3, "env_model_fit_steps": 6}
    return build_config(over)


def test_dyna_with_an_online_env_model_imagines_half_the_episodes_and_learns_the_env(tiny_llama, prompts_file, tmp_path):
    from dynalm.run import train

    run = train(_dyna_cfg(tiny_llama, prompts_file, tmp_path, 4), tmp_path / "run", echo=lambda s: None)
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # 2 groups of 2 per step: step 1 (warm-up) all real, then 1 group real and 1 imagined; Echo ends after 3 turns
    assert [m["dyna/real_steps"] for m in ms] == [12, 18, 24, 30]
    assert ms[0]["dyna/imagined_steps"] == 0 and all(2 <= b["dyna/imagined_steps"] - a["dyna/imagined_steps"] <= 8
                                                     for a, b in zip(ms, ms[1:]))
    # measured on each step's new real transitions before refitting on them: it learns the environment
    assert ms[-1]["dyna/env_model_nll"] < 0.5 * ms[0]["dyna/env_model_nll"]
    ls = [json.loads(x) for x in (run / "transitions.jsonl").open()]
    imagined = [t for t in ls if t["info"].get("imagined")]
    assert {t["step"] for t in imagined} == {2, 3, 4} and len(ls) - len(imagined) == 30
    from dynalm.envmodel.data import read_transitions

    assert len(read_transitions(str(run))) == 30  # an environment model learns from the real ones only


def test_dyna_with_an_env_model_resumes_exactly(tiny_llama, prompts_file, tmp_path):
    import shutil

    from dynalm.run import train

    from test_resume import _metrics

    full = train(_dyna_cfg(tiny_llama, prompts_file, tmp_path, 3), tmp_path / "full", echo=lambda s: None)
    part = train(_dyna_cfg(tiny_llama, prompts_file, tmp_path, 3), tmp_path / "part", echo=lambda s: None)
    shutil.rmtree(part / "checkpoints" / "step-000003")
    (part / "checkpoints" / "latest").write_text("step-000002\n")
    train(None, resume=part, echo=lambda s: None)
    assert _metrics(part) == _metrics(full)


def test_dyna_env_model_config_checks():
    from dynalm.config import build_config

    with pytest.raises(Exception, match="dyna.env_model learns a multi-turn environment"):
        build_config({"dyna": {"enabled": True, "env_model": "online"}})
    with pytest.raises(Exception, match="for a multi-turn environment set dyna.env_model"):
        build_config({"env": {"kind": "dialog"}, "rewards": [{"name": "relevance"}], "dyna": {"enabled": True}})


class _CountingImagination:
    """A stand-in for the learned model: each imagined turn pays the number of 'cat' in the action."""

    max_turns = 3

    def start_from(self, convs, turn=0):
        self.msgs = [list(c) for c in convs]
        self.starts = getattr(self, "starts", 0) + 1

    def advance(self, live, replies, last_tokens, ended, *, training, generator=None, score=True):
        from dynalm.envs.base import Turn

        for j, r in zip(live, replies):
            self.msgs[j] = self.msgs[j] + [A(r), U("more")]
        return Turn([float(r.split().count("cat")) for r in replies], {}, [False] * len(live), [False] * len(live))

    def messages(self, j):
        return self.msgs[j]


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_lookahead_takes_the_candidate_with_the_best_imagined_return(algo, tiny_llama, prompts_file, tmp_path):
    from dynalm.config import build_config
    from dynalm.envs import make_env
    from dynalm.models.policy import PolicyValueModel
    from dynalm.planning.lookahead import plan_lookahead
    from dynalm.run import train_rows

    (tmp_path / "echo_env.py").write_text(ECHO_ENV)
    over = tiny_overrides(tiny_llama, prompts_file, generation={"max_new_tokens": 8}, algorithm={"name": algo, "num_generations": 2})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{tmp_path / 'echo_env.py'}:make_env", "max_turns": 3, "turn_gamma": 0.5}
    over["planner"] = {"n": 4, "depth": 2}
    cfg = build_config(over)
    model = PolicyValueModel.from_config(cfg)
    assert (model.value_head is None) == (algo == "grpo")  # grpo: no critic, G is the imagined rewards alone
    env, imagine = make_env(cfg, model), _CountingImagination()
    res = plan_lookahead(model, env, imagine, train_rows(cfg)[:2], cfg, generator=torch.Generator().manual_seed(0))
    assert res.env_steps == sum(res.turns) == 6  # Echo ends after 3 turns: one real step per turn per episode
    assert imagine.starts == 3 and res.imagined_steps == 2 * 4 * (2 + 2 + 1)  # depth 2, then 1 at the last turn
    for tr, gs in zip(res.transcripts, res.imagined_returns):
        chosen = [t["content"] for t in tr if t["role"] == "assistant"]
        assert [len(g) for g in gs] == [4, 4, 4]
        # G = cat(a) + 0.5·cat(the policy's imagined next turn); the last turn sees one turn: G = cat(a), argmax taken
        if algo == "grpo":
            assert all(max(g) >= a.split().count("cat") for a, g in zip(chosen, gs))
        # the last turn reaches the turn budget: no critic value is added there, with or without a critic
        assert max(gs[2]) == chosen[2].split().count("cat")
