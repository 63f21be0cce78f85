"""Real transitions recorded for an environment model (issue 15, item 1)."""

import json

import yaml

from dynalm.cli import main
from dynalm.transitions import episode_transitions

from conftest import tiny_overrides
from test_custom_env import ENV_FILE

U, T = {"role": "user", "content": "guess"}, {"role": "tool", "content": "42"}


def test_transitions_of_a_transcript_by_hand():
    turns = [U, {"role": "assistant", "content": "a", "reward": 1.0, "terms": {"env": 1.0}, "info": {"k": 1}}, T,
             {"role": "assistant", "content": "b", "reward": 2.0}, {"role": "user", "content": "lower"},
             {"role": "assistant", "content": "c", "reward": 0.0}]
    tr = episode_transitions(turns)
    assert [t["action"] for t in tr] == ["a", "b", "c"] and [t["reward"] for t in tr] == [1.0, 2.0, 0.0]
    assert tr[0]["state"] == [U] and tr[0]["next_observation"] == [T] and tr[0]["info"] == {"k": 1}
    assert tr[1]["state"] == [U, {"role": "assistant", "content": "a"}, T]
    assert [(t["terminated"], t["truncated"]) for t in tr] == [(False, False), (False, False), (True, False)]
    assert tr[2]["next_observation"] is None
    # cut after the last allowed turn: the observation that came is kept, and it is truncated
    cut = episode_transitions([U, {"role": "assistant", "content": "a", "reward": 0.5}, T])
    assert cut[0]["truncated"] and not cut[0]["terminated"] and cut[0]["next_observation"] == [T]
    # the env said truncated
    said = episode_transitions([U, {"role": "assistant", "content": "a", "reward": 0.5, "truncated": True}])
    assert said[0]["truncated"] and not said[0]["terminated"]


def _lines(run):
    return [json.loads(x) for x in (run / "transitions.jsonl").read_text().splitlines()]


def test_a_custom_env_run_records_train_and_eval_transitions(tiny_llama, prompts_file, tmp_path):
    (tmp_path / "my_env.py").write_text(ENV_FILE)
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                          eval={"max_prompts": 3, "batch_size": 4}, log={"checkpoint_every": 1})
    over.pop("data"), over.pop("rewards")
    over["env"] = {"kind": "custom", "factory": f"{tmp_path / 'my_env.py'}:make_env", "max_turns": 4, "record_transitions": True}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    run = tmp_path / "run"
    assert main(["train", "-c", str(p), "--out", str(run)]) == 0
    ls = _lines(run)
    train = [t for t in ls if t["source"] == "train"]
    assert len(train) == 2 * 4 * 3 and {t["step"] for t in train} == {1, 2}  # steps × episodes × turns
    assert len([t for t in ls if t["source"] == "eval-base"]) == 3 * 3 == len([t for t in ls if t["source"] == "eval-trained"])
    ep = [t for t in train if t["episode"] == "train-1-0"]
    assert [t["turn"] for t in ep] == [0, 1, 2] and ep[0]["state"][0]["content"] == "game 0: say something"
    assert ep[0]["next_observation"] == [{"role": "tool", "content": "result 1"}] and ep[2]["terminated"]
    assert all(t["reward"] == float(t["action"].count("a")) for t in train)
    assert all(isinstance(v, int) for t in ls for v in t["tokens"].values()) and ep[0]["tokens"]["next_observation"] > 0
    # a resume from step 1 drops step 2's transitions (and the eval's) with the metrics
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000002")
    (run / "checkpoints" / "latest").write_text("step-000001\n")
    assert main(["train", "--resume", str(run)]) == 0
    again = _lines(run)
    assert [t for t in again if t["source"] == "train"] == train


def test_a_text_run_records_single_turn_transitions(tiny_llama, prompts_file, tmp_path):
    over = tiny_overrides(tiny_llama, prompts_file, eval={"max_prompts": 2}, env={"record_transitions": True})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    run = tmp_path / "run"
    assert main(["train", "-c", str(p), "--out", str(run)]) == 0
    ls = _lines(run)
    assert len([t for t in ls if t["source"] == "train"]) == 2 * 4
    assert all(t["terminated"] and t["next_observation"] is None and t["turn"] == 0 for t in ls)
    assert {t["source"] for t in ls} == {"train", "eval-base", "eval-trained"}
    assert "distinct1" in ls[0]["terms"]
