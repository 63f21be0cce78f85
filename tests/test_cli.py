"""The whole CLI on tiny random-init models: train → eval → generate → export reload, and user errors."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from dynalm.cli import main

from conftest import tiny_overrides


def _write_cfg(tmp_path, model_dir, prompts_file, **extra):
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(tiny_overrides(model_dir, prompts_file, **extra)))
    return p


@pytest.mark.parametrize("fixture,algo", [("tiny_llama", "ppo"), ("tiny_gpt2", "a2c"), ("tiny_llama", "grpo"), ("tiny_gpt2", "rloo")])
def test_train_eval_generate_export(fixture, algo, request, tmp_path, prompts_file, capsys):
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    model_dir = request.getfixturevalue(fixture)
    n = 2 if algo in ("grpo", "rloo") else 1
    cfg = _write_cfg(tmp_path, model_dir, prompts_file, algorithm={"name": algo, "num_generations": n})
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--out", str(run), "--set", "train.steps=3", "--set", "log.samples_every=1"]) == 0
    assert f"run directory: {run}" in capsys.readouterr().out

    # run directory contents
    for name in ["config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "report.md", "report.html", "curves.png", "export/config.json"]:
        assert (run / name).exists(), name
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 3
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ["reward", "reward_std", "reward/distinct1", "kl", "entropy", "policy_loss", "value_loss", "approx_kl",
                "clipfrac", "completion_len", "tokens_per_s", "time/rollout", "time/reward", "time/update"]:
        assert key in metrics[0], key
    if algo in ("a2c", "ppo"):
        assert "explained_variance" in metrics[0]
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3} and "distinct1" in samples[0]
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev) >= {"base", "trained", "delta_reward"}
    for side in ("base", "trained"):
        assert {"reward", "reward/distinct1", "kl", "perplexity_ref", "distinct1", "distinct2", "mean_length"} <= set(ev[side])
    assert ev["base"]["kl"] == 0.0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-000003"

    # export reloads with plain transformers and matches the trained policy
    exported = AutoModelForCausalLM.from_pretrained(run / "export").eval()
    from dynalm.trained import load_run

    _, pol = load_run(run)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a = exported(input_ids=ids).logits
        b = pol.lm(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    if algo in ("a2c", "ppo"):
        vh = load_file(str(run / "export" / "value_head.safetensors"))
        assert torch.equal(vh["weight"], pol.value_head.weight.detach())

    # eval and generate from the run
    assert main(["eval", "--run", str(run)]) == 0
    assert "| reward |" in capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--prompt", "the cat", "-n", "2", "--json", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(x["prompt"] == "the cat" for x in lines)
    # generate from a model directly
    assert main(["generate", "--model", str(model_dir), "--prompt", "a dog", "--greedy", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("### a dog")


def test_eval_model_writes_out(tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file)
    out = tmp_path / "ev.json"
    assert main(["eval", "--model", str(tiny_llama), "-c", str(cfg), "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert "model" in ev and "trained" not in ev and ev["n_prompts"] == 6
    assert ev["model"]["planner"] == "sample" and ev["model"]["kl"] == 0.0


def test_existing_run_is_refused_and_untouched(tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file, eval={"enabled": False})
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["train", "-c", str(cfg), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == f"dynalm: error: '{run}' already holds a run (pick another --out, resume it with --resume, or pass --force to overwrite)\n"
    assert (run / "metrics.jsonl").read_bytes() == before


ERROR_CASES = [
    (["train", "-c", "nope.yaml"], "dynalm: error: config file 'nope.yaml' not found (check the path, e.g. configs/story.yaml)"),
    (["train", "-c", "{cfg}", "--set", "train.stpes=3"], "dynalm: error: unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    (["train", "-c", "{cfg}", "--set", "algorithm.name=dqn"], "dynalm: error: config key 'algorithm.name': Input should be 'a2c', 'ppo', 'grpo', 'rloo' or 'reinforce_pp', got 'dqn' (fix the value in the config or with --set)"),
    (["train", "-c", "{cfg}", "--set", "train.steps=-1"], "dynalm: error: config key 'train.steps': Input should be greater than or equal to 0, got -1 (fix the value in the config or with --set)"),
    (["train", "-c", "{cfg}", "--set", "algorithm.name=ppo", "--set", "model.value_head=false"], "dynalm: error: invalid config: algorithm ppo needs a value head but model.value_head is false (fix the config)"),
    (["train", "-c", "{cfg}", "--set", "algorithm.name=grpo"], "dynalm: error: invalid config: algorithm.num_generations must be >= 2 for grpo (group baselines need several completions per prompt) (fix the config)"),
    (["train", "-c", "{cfg}", "--set", "data.train=missing.jsonl"], "dynalm: error: data file 'missing.jsonl' not found (check the path in data.train / data.eval)"),
    (["train", "-c", "{cfg}", "--set", "rewards.0.name=distinkt1"], "dynalm: error: unknown reward 'distinkt1' (did you mean 'distinct1'?)"),
    (["train", "-c", "{cfg}", "--set", "model.name=./no/such/model"], "dynalm: error: model path './no/such/model' not found (check the path)"),
    (["generate", "--prompt", "x"], "dynalm: error: one of the arguments --run --model is required (see `dynalm generate --help`)"),
    (["eval", "--run", "{tmp}"], "dynalm: error: '{tmp}' is not a run directory (no config.yaml) (pass the folder printed by `dynalm train`)"),
]


@pytest.mark.parametrize("argv,expected", ERROR_CASES)
def test_user_errors_are_one_line_exit_2(argv, expected, tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file)
    sub = lambda s: s.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path))  # noqa: E731
    assert main([sub(a) for a in argv]) == 2
    assert capsys.readouterr().err == sub(expected) + "\n"


def test_bad_reward_function_outputs(tiny_llama, tmp_path, prompts_file, capsys):
    rf = tmp_path / "bad.py"
    rf.write_text(
        "def short(prompts, completions, **kw):\n    return [1.0]\n"
        "def text(prompts, completions, **kw):\n    return ['x'] * len(completions)\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def boom(prompts, completions, **kw):\n    raise RuntimeError('kaput')\n"
    )
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file)
    expect = {
        "short": "reward function 'short' returned 1 values for 4 completions (return one float per completion)",
        "text": "reward function 'text' returned a non-number at index 0: 'x' (return floats)",
        "nan": "reward function 'nan' returned nan at index 0 (return finite numbers)",
        "boom": "reward function 'boom' raised RuntimeError: kaput (fix the reward function)",
    }
    for fn, msg in expect.items():
        out = tmp_path / f"run-{fn}"
        assert main(["train", "-c", str(cfg), "--out", str(out), "--set", f"rewards.0.name={rf}:{fn}"]) == 2
        assert capsys.readouterr().err == f"dynalm: error: {msg}\n"


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dynalm", "train", "-c", str(tmp_path / "x.yaml")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"dynalm: error: config file '{tmp_path / 'x.yaml'}' not found (check the path, e.g. configs/story.yaml)"]


def test_planners_through_cli(tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file, algorithm={"name": "ppo"}, planner={"simulations": 3, "top_k": 3})
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--out", str(run)]) == 0
    for planner in ["best-of-n", "mcts"]:
        assert main(["eval", "--run", str(run), "--planner", planner]) == 0
        ev = json.loads((run / f"eval-{planner}.json").read_text())
        assert "base" not in ev and ev["trained"]["planner"] == planner and ev["trained"]["n"] == 6
        assert ev["trained"]["forward_calls"] > 0 and ev["trained"]["seconds_per_sample"] > 0
    report = (run / "report.md").read_text()
    assert "| planner | reward |" in report and "| mcts |" in report and "| best-of-n |" in report
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "the cat", "--planner", "mcts", "--json",
                 "--max-new-tokens", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["planner"] == "mcts" and out["prompt"] == "the cat"
    # a plain model has no value head: value-guided search says so in one line, and names the fix
    assert main(["generate", "--model", str(tiny_llama), "--prompt", "x", "--planner", "mcts"]) == 2
    assert capsys.readouterr().err == (
        "dynalm: error: planner 'mcts' needs a value head to score leaves "
        "(set model.value_head: true, or use --set planner.leaf=rollout)\n"
    )
    # ... which works: rollout leaves need only the policy and the reward
    assert main(["generate", "--model", str(tiny_llama), "--prompt", "x", "--planner", "mcts", "--json",
                 "--max-new-tokens", "3", "--set", "planner.leaf=rollout", "--set", "planner.simulations=3"]) == 0
    assert json.loads(capsys.readouterr().out)["planner"] == "mcts"


def test_train_rm_then_drive_a_run(tiny_llama, tmp_path, prompts_file, capsys):
    import random

    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "on", "mat", "big", "red"]
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as fh:
        for _ in range(64):
            base = " ".join(rng.choice(words) for _ in range(4))
            fh.write(json.dumps({"prompt": "the cat", "chosen": base + " yes", "rejected": base + " no"}) + "\n")
    rm = tmp_path / "rm"
    argv = ["train-rm", "--data", str(pairs), "--out", str(rm), "--model", str(tiny_llama),
            "--set", "epochs=5", "--set", "learning_rate=1e-2", "--set", "lora_r=4", "--set", "eval_fraction=0.25"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy:" in out and (rm / "reward_model.safetensors").is_file()
    meta = json.loads((rm / "reward_model.json").read_text())
    assert meta["metrics"]["after"]["accuracy"] >= 0.9
    # the learned model is a reward like any other
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file, rewards=[{"name": f"rm:{rm}"}], eval={"enabled": False})
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--out", str(run)]) == 0
    m = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert "reward/reward_model" in m
    assert main(["train-rm", "--data", str(pairs), "--out", str(rm), "--set", "epoch=3"]) == 2
    assert capsys.readouterr().err == "dynalm: error: unknown config key 'epoch' (did you mean 'epochs'?)\n"


MORE_ERRORS = [
    (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "0"],
     "dynalm: error: config key 'temperature': Input should be greater than 0, got 0.0 (fix the value in the config or with --set)"),
    (["generate", "--model", "{model}", "--prompt", "x", "--max-new-tokens", "-1"],
     "dynalm: error: config key 'max_new_tokens': Input should be greater than or equal to 1, got -1 (fix the value in the config or with --set)"),
    (["train", "-c", "{cfg}", "--set", "rewards.x.weight=2"],
     "dynalm: error: --set rewards.x: there are 1 reward terms (use an index in range)"),
    (["train", "-c", "{cfg}", "--set", "rewards.0.name=:fn"],
     "dynalm: error: reward ':fn' names no module before the colon (write 'package.module:function' or 'file.py:function')"),
    (["train", "-c", "{cfg}", "--out", "{cfg}"], "dynalm: error: --out '{cfg}' is a file (pick a folder for the run)"),
    (["eval", "--model", "{model}", "-c", "{cfg}", "--out", "{tmp}"], "dynalm: error: --out '{tmp}' is a folder (give a file name, e.g. eval.json)"),
]


@pytest.mark.parametrize("argv,expected", MORE_ERRORS)
def test_more_user_errors(argv, expected, tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file)
    sub = lambda s: s.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp_path)).replace("{model}", str(tiny_llama))  # noqa: E731
    assert main([sub(a) for a in argv]) == 2
    assert capsys.readouterr().err == sub(expected) + "\n"


def test_user_files_in_out_are_never_deleted(tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file, eval={"enabled": False})
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my notes")
    for extra in ([], ["--force"]):
        assert main(["train", "-c", str(cfg), "--out", str(out), *extra]) == 2
        assert capsys.readouterr().err == f"dynalm: error: '{out}' holds 'report.md' but is not a dynalm run (pick an empty or new --out folder)\n"
    assert (out / "report.md").read_text() == "my notes"


def test_run_model_cannot_be_changed_by_set(tiny_llama, tmp_path, prompts_file, capsys):
    cfg = _write_cfg(tmp_path, tiny_llama, prompts_file, eval={"enabled": False})
    run = tmp_path / "run"
    assert main(["train", "-c", str(cfg), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--set", "model.lora.r=8"]) == 2
    assert capsys.readouterr().err == (
        f"dynalm: error: --set model.* cannot change the model of a trained run (evaluate another model with --model, e.g. --model {run}/export)\n"
    )
