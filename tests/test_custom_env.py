"""Bring-your-own environments (env.kind: custom): the interface, the one rollout, errors, seeds, tools."""

import json

import pytest
import torch
import yaml

from dynalm.cli import main
from dynalm.config import build_config
from dynalm.envs import CustomEnv
from dynalm.envs.custom import EVAL_SEED_BASE, SeedRow, eval_seed_rows, train_seed_rows
from dynalm.envs.tools import parse_tool_call
from dynalm.errors import UserError
from dynalm.models.policy import PolicyValueModel
from dynalm.rl.episodes import rollout

from conftest import tiny_overrides

# Written from the README's description alone: gymnasium's reset/step, text in and out.
ENV_FILE = '''
class Counter:
    """Three turns at most; reward = the number of 'a' in the action; the second observation is a tool message."""

    def __init__(self, turns=3, fail_on=None):
        self.turns, self.fail_on = turns, fail_on

    def reset(self, seed=None, options=None):
        if self.fail_on == "reset":
            raise RuntimeError("no game today")
        self.t, self.seed = 0, seed
        return f"game {seed}: say something", {}

    def step(self, action):
        self.t += 1
        if self.fail_on == "step" and self.t == 2:
            raise KeyError("boom")
        if self.fail_on == "nan":
            return "x", float("nan"), False, False, {}
        if self.fail_on == "obs":
            return 42, 0.0, False, False, {}
        obs = [{"role": "tool", "content": f"result {self.t}"}] if self.t == 1 else f"turn {self.t}"
        done = self.t >= self.turns
        return obs, float(action.count("a")), done, False, {"success": done and action.count("a") > 0}


def make_env(**kwargs):
    return Counter(**kwargs)
'''


@pytest.fixture()
def env_file(tmp_path):
    p = tmp_path / "my_env.py"
    p.write_text(ENV_FILE)
    return p


def _cfg(tiny, prompts_file, env_file, **extra):
    over = tiny_overrides(tiny, prompts_file, **extra)
    over["env"] = {"kind": "custom", "factory": f"{env_file}:make_env", "max_turns": 4, **over.get("env", {})}
    over.pop("data")  # a custom env without data: episodes by seed
    if "rewards" not in extra:
        over.pop("rewards")
    return build_config(over)


def test_custom_defaults_need_no_data_or_rewards(tiny_llama, prompts_file, env_file):
    cfg = _cfg(tiny_llama, prompts_file, env_file)
    assert cfg.data.train is None and cfg.data.eval is None and cfg.rewards == []
    rows = train_seed_rows(cfg)
    assert rows.ordered and rows[0] == {"seed": 0} and rows[5] == {"seed": 5} and isinstance(rows[0], SeedRow)
    ev = list(eval_seed_rows(cfg))
    assert ev[0] == {"seed": EVAL_SEED_BASE} and len(ev) == 32
    with pytest.raises(UserError, match="needs env.factory"):
        build_config({"env": {"kind": "custom"}})


def test_rollout_layout_rewards_and_masks(tiny_llama, prompts_file, env_file):
    cfg = _cfg(tiny_llama, prompts_file, env_file, generation={"max_new_tokens": 5})
    model = PolicyValueModel.from_config(build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "ppo"})))
    env = CustomEnv(cfg, model.tokenizer)
    rows = [SeedRow(seed=7), SeedRow(seed=7), SeedRow(seed=8)]
    batch, _, info = rollout(model, env, rows, [0, 0, 1], cfg.generation, max_prompt_tokens=64,
                             generator=torch.Generator().manual_seed(0))
    # three assistant turns each (the env ends at turn 3), observations between them are context
    assert info["episode/turns"] == 3 and info["episode/truncated"] == 0
    assert batch.prompts == ["game 7: say something"] * 2 + ["game 8: say something"]
    for i, tr in enumerate(batch.extras["transcript"]):
        roles = [t["role"] for t in tr]
        assert roles == ["user", "assistant", "tool", "assistant", "user", "assistant"]
        a_turns = [t for t in tr if t["role"] == "assistant"]
        assert [t["reward"] for t in a_turns] == [float(t["content"].count("a")) for t in a_turns]
        # each turn's reward sits on that turn's last action token, nothing elsewhere
        ids = batch.turn_ids[i]
        for k, t in enumerate(a_turns):
            last = int((ids == k).nonzero().max())
            assert float(batch.turn_scores[i, last]) == t["reward"]
        assert float(batch.turn_scores[i].sum()) == pytest.approx(float(batch.scores[i]))
        assert torch.all(batch.action_mask[i][ids < 0] == 0)
        assert int((batch.action_mask[i] > 0).sum()) == int((ids >= 0).sum())
    assert batch.reward_terms["env"].tolist() == batch.scores.tolist()
    # log-probs and values recorded turn by turn equal one forward over the whole sequence
    full = model(batch.input_ids, batch.attention_mask, batch.n_actions)
    m = batch.action_mask
    assert torch.allclose(full.logprobs * m, batch.logprobs * m, atol=1e-5)
    assert torch.allclose(full.values * m, batch.values * m, atol=1e-5)


def test_an_episode_that_never_ends_is_cut_at_max_turns(tiny_llama, prompts_file, env_file):
    cfg = _cfg(tiny_llama, prompts_file, env_file, env={"max_turns": 2, "kwargs": {"turns": 99}})
    model = PolicyValueModel.from_config(build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})))
    batch, _, info = rollout(model, CustomEnv(cfg, model.tokenizer), [SeedRow(seed=1)] * 2, [0, 0], cfg.generation, max_prompt_tokens=64)
    assert info["episode/turns"] == 2 and info["episode/truncated"] == 1.0
    assert not batch.ended.any()


def test_a_custom_env_with_one_turn_still_keeps_its_transcript(tiny_llama, prompts_file, env_file):
    """max_turns 1 used to take the text env's single-turn shortcut: no transcript, no episode
    info, and eval of such a run failed."""
    cfg = _cfg(tiny_llama, prompts_file, env_file, env={"max_turns": 1})
    model = PolicyValueModel.from_config(build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})))
    batch, _, info = rollout(model, CustomEnv(cfg, model.tokenizer), [SeedRow(seed=1)] * 2, [0, 0], cfg.generation, max_prompt_tokens=64)
    assert info["episode/turns"] == 1 and info["episode/truncated"] == 1.0
    for tr in batch.extras["transcript"]:
        assert [t["role"] for t in tr] == ["user", "assistant", "tool"]  # cut: the env's answer is kept
        assert tr[1]["reward"] == float(tr[1]["content"].count("a"))


def test_configured_rewards_compose_per_turn_or_on_the_last_turn(tiny_llama, prompts_file, env_file, tmp_path):
    (tmp_path / "r.py").write_text("def bonus(completions, turn, **kw):\n    return [10.0 * t for t in turn]\n")
    model = PolicyValueModel.from_config(build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})))
    for on, expect in (("turn", [10.0, 20.0, 30.0]), ("episode", [0.0, 0.0, 30.0])):
        cfg = _cfg(tiny_llama, prompts_file, env_file, env={"rewards_on": on}, rewards=[{"name": f"{tmp_path / 'r.py'}:bonus", "weight": 0.5}])
        batch, _, _ = rollout(model, CustomEnv(cfg, model.tokenizer), [SeedRow(seed=1)], [0], cfg.generation, max_prompt_tokens=64)
        a_turns = [t for t in batch.extras["transcript"][0] if t["role"] == "assistant"]
        assert [t["terms"]["bonus"] for t in a_turns] == expect
        assert [t["reward"] for t in a_turns] == [t["terms"]["env"] + 0.5 * b for t, b in zip(a_turns, expect)]
        assert float(batch.reward_terms["bonus"][0]) == sum(expect)


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_trains_and_evaluates_through_the_cli(tiny_llama, prompts_file, env_file, tmp_path, algo):
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": algo, "num_generations": 2 if algo == "grpo" else 1},
                          eval={"max_prompts": 3, "batch_size": 4})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{env_file}:make_env", "max_turns": 4, "transcripts": 2}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    run = tmp_path / "run"
    before = {n: t.clone() for n, t in PolicyValueModel.from_config(build_config(over)).trainable_state_dict().items()}
    assert main(["train", "-c", str(p), "--out", str(run)]) == 0
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(ms) == 2 and all(m["episode/turns"] == 3 for m in ms) and "reward/env" in ms[0] and "reward/turn_3" in ms[0]
    ev = json.loads((run / "eval.json").read_text())
    for side in ("base", "trained"):
        r = ev[side]
        assert r["n"] == 3 and r["turns_per_episode"] == 3.0 and 0.0 <= r["success_rate"] <= 1.0 and "reward/turn_2" in r
    trans = [json.loads(x) for x in (run / "transcripts.jsonl").read_text().splitlines()]
    assert len(trans) == 4 and trans[0]["seed"] == EVAL_SEED_BASE and trans[0]["turns"][0]["content"].startswith("game 1000000000")
    ckpt = torch.load(run / "checkpoints" / "step-000002" / "state.pt", weights_only=False)
    n = 2 if algo == "grpo" else 1
    assert ckpt["sampler"] == {"epoch": 0, "pos": 2 * (4 // n)}  # seeds 0, 1, … taken in order, one per group
    from safetensors.torch import load_file

    after = load_file(run / "checkpoints" / "step-000002" / "weights.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora" in k)


def test_best_of_n_per_turn_keeps_the_best_of_n_forked_steps(tiny_llama, prompts_file, env_file, tmp_path, capsys):
    from dynalm.planning.episodes import plan_episodes

    cfg = _cfg(tiny_llama, prompts_file, env_file, generation={"max_new_tokens": 6})
    model = PolicyValueModel.from_config(build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})))
    env = CustomEnv(cfg, model.tokenizer)
    res = plan_episodes(model, env, [SeedRow(seed=3), SeedRow(seed=4)], 4, cfg.generation, max_prompt_tokens=64,
                        generator=torch.Generator().manual_seed(0))
    assert res.turns == [3, 3] and res.env_steps == 2 * 3 * 4 and res.truncated == [False, False]
    for tr, cands, tot in zip(res.transcripts, res.candidate_rewards, res.totals):
        a_turns = [t for t in tr if t["role"] == "assistant"]
        # each kept turn is the best of its 4 candidates, and its reward is the env's count of 'a'
        assert [t["reward"] for t in a_turns] == [max(c) for c in cands]
        assert [t["reward"] for t in a_turns] == [float(t["content"].count("a")) for t in a_turns]
        assert tot == sum(max(c) for c in cands)
        assert [t["role"] for t in tr] == ["user", "assistant", "tool", "assistant", "user", "assistant"]
    # through the CLI: a trained custom-env run evaluated with the planner
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2}, eval={"max_prompts": 2})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{env_file}:make_env", "max_turns": 4}
    over["train"] = {"steps": 1, "batch_size": 4}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(p), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--planner", "best-of-n", "--set", "planner.n=3"]) == 0
    out = capsys.readouterr().out
    assert "| env_steps | 18 |" in out and "| turns_per_episode | 3 |" in out  # 2 games × 3 turns × n = 3
    assert json.loads((tmp_path / "run" / "eval-best-of-n.json").read_text())["trained"]["planner"] == "best-of-n"


@pytest.mark.parametrize("fail_on,expected", [
    ("reset", "dynalm: error: env '{f}:make_env' reset raised RuntimeError: no game today (fix the environment)"),
    ("step", "dynalm: error: env '{f}:make_env' step (turn 2) raised KeyError: 'boom' (fix the environment)"),
    ("nan", "dynalm: error: env '{f}:make_env' step (turn 1) returned the reward nan (return a finite float)"),
    ("obs", "dynalm: error: env '{f}:make_env' step (turn 1) returned an observation of type int, not text or chat messages "
            "(return a string or a list of {{\"role\": ..., \"content\": ...}} messages)"),
])
def test_a_bad_environment_is_one_line_naming_it_and_the_turn(tiny_llama, prompts_file, env_file, tmp_path, capsys, fail_on, expected):
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{env_file}:make_env", "kwargs": {"fail_on": fail_on}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == expected.format(f=env_file)
    assert "Traceback" not in "\n".join(err)


def test_a_factory_that_does_not_import_is_one_line(tiny_llama, prompts_file, tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("import not_a_module_anywhere\n")
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{bad}:make_env"}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(p), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"dynalm: error: env factory file '{bad}' failed to import: ModuleNotFoundError: "
                       "No module named 'not_a_module_anywhere' (fix the file)")


def test_parse_tool_call():
    call = parse_tool_call('Let me compute. <tool_call>{"name": "calculator", "arguments": {"expression": "3*4"}}</tool_call>')
    assert call == {"name": "calculator", "arguments": {"expression": "3*4"}}
    assert parse_tool_call('<tool_call>{"name": "c", "arguments": "{\\"x\\": 1}"}') == {"name": "c", "arguments": {"x": 1}}
    assert parse_tool_call('<tool_call>{"name": "c"} and more') == {"name": "c", "arguments": {}}
    assert parse_tool_call("Answer: 12") is None
    assert parse_tool_call("<tool_call>not json</tool_call>") is None


def test_example_environments():
    import importlib.util

    def load(name):
        spec = importlib.util.spec_from_file_location(name, f"examples/envs/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    calc = load("calculator").make_env()
    obs, info = calc.reset(seed=3)
    assert "calculator" in obs
    ans = info["answer"]
    obs, r, term, trunc, _ = calc.step('<tool_call>{"name": "calculator", "arguments": {"expression": "2 * (3 + 4)"}}</tool_call>')
    assert obs == [{"role": "tool", "content": "14"}] and r == 0.0 and not term
    obs, r, term, _, info = calc.step(f"Answer: {ans}")
    assert r == 1.0 and term and info["success"]
    calc.reset(seed=3)
    assert calc.step(f"Answer: {ans + 1}")[1] == 0.1  # the asked-for format, the wrong number
    calc.reset(seed=3)
    assert calc.step("I do not know")[1] == 0.0

    game = load("guess_number").make_env(low=1, high=20, max_guesses=6)
    _, info = game.reset(seed=5)
    secret = info["secret"]
    assert game.reset(seed=5)[1]["secret"] == secret  # the seed fixes the game
    obs, r, term, _, _ = game.step(str(secret - 1) if secret > 1 else str(secret + 1))
    assert ("Higher" in obs if secret > 1 else "Lower" in obs) and r == -0.05 and not term
    obs, r, term, _, _ = game.step("no idea")
    assert obs.startswith("Please reply with just a number") and r == pytest.approx(-0.15) and not term
    obs, r, term, _, info = game.step(f"It is {secret}")
    assert obs == "Correct!" and r == pytest.approx(0.95) and term and info["success"]


def test_the_readme_environment_trains_under_grpo_and_ppo(tiny_llama, prompts_file, tmp_path):
    """The environment of the README's "Bring your own environment", as a user copies it."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    block = re.search(r"```python\n# my_env.py\n(.*?)```", readme.read_text(), re.DOTALL).group(1)
    (tmp_path / "my_env.py").write_text(block)
    for algo in ("grpo", "ppo"):
        over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": algo, "num_generations": 2 if algo == "grpo" else 1},
                              eval={"max_prompts": 2})
        over.pop("data"), over.pop("rewards")
        over["env"] = {"kind": "custom", "factory": f"{tmp_path / 'my_env.py'}:make_env", "max_turns": 8}
        p = tmp_path / f"{algo}.yaml"
        p.write_text(yaml.safe_dump(over))
        run = tmp_path / algo
        assert main(["train", "-c", str(p), "--out", str(run)]) == 0
        ev = json.loads((run / "eval.json").read_text())
        assert 1 <= ev["trained"]["turns_per_episode"] <= 5 and "success_rate" in ev["trained"]
