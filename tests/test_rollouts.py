"""`dynalm rollouts`: rated completions written for train-rm, and the path rollouts → train-rm → critic_init."""

import json

import pytest
import yaml

from dynalm.cli import main
from dynalm.config import build_config
from dynalm.errors import UserError
from dynalm.rewards import RewardSet
from dynalm.rollouts import rated_rows

from conftest import tiny_overrides


def _cfg_file(tmp_path, model_dir, prompts_file, **extra):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_overrides(model_dir, prompts_file, data={"template": "Story: {prompt}"}, **extra)))
    return p


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rollouts_write_rated_completions_for_train_rm(tiny_llama, prompts_file, tmp_path, capsys):
    cfg = _cfg_file(tmp_path, tiny_llama, prompts_file)
    out = tmp_path / "ro" / "rollouts.jsonl"
    assert main(["rollouts", "-c", str(cfg), "--out", str(out), "--prompts", "3", "--per-prompt", "2", "--batch", "4"]) == 0
    rows = _rows(out)
    firsts = [json.loads(x)["prompt"] for x in prompts_file.read_text().splitlines()[:3]]
    assert [r["prompt"] for r in rows] == [f"Story: {p}" for p in firsts for _ in range(2)]  # the template applied
    # each reward is the config's own reward of that completion (distinct1), scored again here
    rewards = RewardSet(build_config(yaml.safe_load(cfg.read_text())).rewards)(firsts, [r["completion"] for r in rows[::2]])
    assert [r["reward"] for r in rows[::2]] == pytest.approx(list(rewards.scores), abs=1e-6)
    assert f"wrote 6 rated completions to {out}" in capsys.readouterr().out
    assert not list(out.parent.glob(".*.tmp"))

    # the same seed gives the same file; an existing file is kept unless --force
    before = out.read_text()
    assert main(["rollouts", "-c", str(cfg), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"dynalm: error: '{out}' already exists (pass --force to replace it, or choose another --out)"
    assert out.read_text() == before
    assert main(["rollouts", "-c", str(cfg), "--out", str(out), "--prompts", "3", "--per-prompt", "2", "--batch", "4", "--force"]) == 0
    assert out.read_text() == before

    # rollouts → train-rm with prefixes → a ppo critic started from it
    rm = tmp_path / "rm"
    assert main(["train-rm", "--data", str(out), "--out", str(rm), "--model", str(tiny_llama), "--set", "prefixes=2",
                 "--set", "eval_fraction=0.34", "--set", "max_tokens=32", "--set", "lora_r=4", "--set", "lora_alpha=8"]) == 0
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--out", str(run), "--set", "train.steps=1", "--set", "algorithm.name=ppo",
                 "--set", "model.critic=model", "--set", f"model.critic_init={rm}"]) == 0
    # and a trained run rolls out too
    again = tmp_path / "again.jsonl"
    assert main(["rollouts", "--run", str(run), "--out", str(again), "--prompts", "2", "--per-prompt", "1"]) == 0
    assert [r["prompt"] for r in _rows(again)] == [f"Story: {p}" for p in firsts[:2]]


@pytest.mark.parametrize("extra,message", [
    ({"model": {"system_prompt": "Be brief."}},
     "a reward model would read these prompts differently from the policy (model.system_prompt or use_chat_template=false) "
     "(unset model.system_prompt and keep model.use_chat_template: true)"),
    ({"model": {"use_chat_template": False}},
     "a reward model would read these prompts differently from the policy (model.system_prompt or use_chat_template=false) "
     "(unset model.system_prompt and keep model.use_chat_template: true)"),
])
def test_rollouts_refuse_prompts_a_reward_model_would_read_otherwise(tiny_llama, prompts_file, tmp_path, capsys, extra, message):
    cfg = _cfg_file(tmp_path, tiny_llama, prompts_file, **extra)
    out = tmp_path / "r.jsonl"
    assert main(["rollouts", "-c", str(cfg), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"dynalm: error: {message}"
    assert not out.exists()


def test_rollouts_refuse_multi_turn_envs_and_conversations(tiny_llama, prompts_file, tmp_path, capsys):
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file))
    with pytest.raises(UserError) as err:
        rated_rows(cfg.model_copy(update={"env": cfg.env.model_copy(update={"kind": "dialog"})}), [{"prompt": "x"}])
    assert str(err.value) == ("rollouts writes single-turn rated completions, and env.kind=dialog is multi-turn "
                              "(record its transitions with env.record_transitions: true and use `dynalm train-env-model`)")
    with pytest.raises(UserError) as err:
        rated_rows(cfg, [{"prompt": [{"role": "user", "content": "hi"}]}])
    assert str(err.value) == "rollouts needs text prompts, and the data holds conversations (give rows whose prompt is a string)"
    assert main(["rollouts", "-c", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "x.jsonl"), "--per-prompt", "0"]) == 2
    assert capsys.readouterr().err.strip() == "dynalm: error: --per-prompt and --batch must be at least 1 (pass 1 or more)"
    out = tmp_path / "d"
    out.mkdir()
    assert main(["rollouts", "-c", str(tmp_path / "nope.yaml"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"dynalm: error: --out '{out}' is a folder (give a file name, e.g. rollouts.jsonl)"
