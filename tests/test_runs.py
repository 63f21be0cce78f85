"""`dynalm runs`: a table of run directories and one plot of their curves (issue 18, item 2)."""

import json

import yaml

from dynalm.cli import main

from conftest import tiny_overrides


def test_runs_table_json_and_plot(tiny_llama, prompts_file, tmp_path, capsys):
    for algo, n in (("grpo", 2), ("ppo", 1)):
        over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": algo, "num_generations": n}, eval={"max_prompts": 2})
        p = tmp_path / f"{algo}.yaml"
        p.write_text(yaml.safe_dump(over))
        assert main(["train", "-c", str(p), "--out", str(tmp_path / "runs" / algo)]) == 0
    (tmp_path / "runs" / "notes.txt").write_text("not a run")
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs"), "--json", "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [json.loads(x) for x in out[:2]]
    assert [r["algorithm"] for r in rows] == ["grpo", "ppo"] and all(r["task"] == "tiny" for r in rows)
    ev = json.loads((tmp_path / "runs" / "grpo" / "eval.json").read_text())
    assert rows[0]["final_reward"] == ev["trained"]["reward"] and rows[0]["base_reward"] == ev["base"]["reward"]
    assert rows[0]["steps"] == 2 and rows[0]["of_steps"] == 2 and rows[0]["wall_seconds"] > 0
    ms = [json.loads(x) for x in (tmp_path / "runs" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["kl"] == ms[-1]["kl"] and "dynalm_version" in rows[1] and "commit" in rows[1]
    assert out[2] == f"wrote {tmp_path / 'curves.png'}" and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["runs", str(tmp_path / "runs" / "grpo"), str(tmp_path / "runs" / "ppo")]) == 0
    table = capsys.readouterr().out
    assert "grpo" in table and "ppo" in table and "base → final eval" in table


def test_no_runs_is_one_line(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"dynalm: error: no run directories in {tmp_path} "
                                       "(pass folders made by `dynalm train` (or the folder holding them))\n")
