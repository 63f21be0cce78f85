"""Every shipped preset trains a tiny model end to end through the CLI."""

import json

import pytest

from dynalm.cli import main


@pytest.mark.parametrize("preset", ["story", "seed", "sentiment", "translation", "poem"])
def test_preset_runs_through_cli(preset, tiny_llama, tmp_path, capsys):
    run = tmp_path / preset
    argv = ["train", "-c", f"configs/{preset}.yaml", "--out", str(run),
            "--set", f"model.name={tiny_llama}", "--set", "model.lora.r=2", "--set", "train.steps=2",
            "--set", "generation.max_new_tokens=5", "--set", "eval.max_prompts=3", "--set", "log.progress=false",
            "--set", "log.tensorboard=false"]
    if preset != "seed":
        argv += ["--set", "train.batch_size=4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    if preset == "seed":  # the article's log line, one per episode
        assert "Episode 1: Cumulative Reward = " in out and "Episode 2: Cumulative Reward = " in out
    else:
        ev = json.loads((run / "eval.json").read_text())
        assert ev["n_prompts"] == 3
        for key in ["reward", "eos_rate", "mean_length", "distinct2", "self_bleu"]:
            assert key in ev["trained"]
