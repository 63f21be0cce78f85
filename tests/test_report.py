"""Report: per-token HTML view, reward-hacking warnings, planner table."""

import dataclasses
import json

import pytest
import torch

from dynalm.config import build_config
from dynalm.interpret import token_batch, token_table, write_token_html
from dynalm.models.policy import PolicyValueModel
from dynalm.report import finalize_report
from dynalm.rl.trainer import Trainer

from conftest import tiny_overrides


def test_token_table_matches_trainer_quantities(tiny_llama, prompts_file, tmp_path):
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "a2c"}, kl={"coef": 0.1}))
    model = PolicyValueModel.from_config(cfg)
    rows = [{"prompt": "the cat sat"}, {"prompt": "once upon a time"}]
    table = token_table(model, rows, cfg)
    assert len(table) == 2
    for s in table:
        n = len(s["tokens"])
        assert n >= 1 and len(s["advantage"]) == len(s["kl"]) == len(s["reward"]) == n
        # reward = −β·KL per token, plus the score on the last token
        for t in range(n - 1):
            assert abs(s["reward"][t] + 0.1 * s["kl"][t]) < 1e-5
        assert abs(s["reward"][-1] - (s["score"] - 0.1 * s["kl"][-1])) < 1e-5
    page = write_token_html(table, tmp_path / "tokens.html").read_text()
    assert page.count("class='tok'") == 3 * sum(len(s["tokens"]) for s in table)
    assert "title='advantage" in page and "title='kl" in page


def test_hacking_flags_reach_report_and_console(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.1, "kl": 0.0}) + "\n")
    base = {"reward": 0.1, "distinct2": 0.9, "kl": 0.0, "mean_length": 40.0, "eos_rate": 0.8, "samples": []}
    trained = {"reward": 0.9, "distinct2": 0.5, "kl": 25.0, "mean_length": 10.0, "eos_rate": 0.1, "samples": []}
    said = []
    report = finalize_report(tmp_path, {"n_prompts": 0, "base": base, "trained": trained, "delta_reward": 0.8}, echo=said.append)
    text = report.read_text()
    assert len(said) == 4 and all(s.startswith("warning: possible reward hacking: ") for s in said)
    assert text.count("> **Warning — possible reward hacking:**") == 4
    assert text.index("Warning") < text.index("## Eval")



@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_token_view_advantages_are_the_updates_own(tiny_llama, prompts_file, algo):
    """Issue 12.7: the view re-derived advantages with the raw kl.coef, without group
    baselines or whitening. Now, for one batch, its advantages equal those the update used,
    with the run's adapted β (here 0.37 against kl.coef 0.1)."""
    n = 1 if algo == "ppo" else 2
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": algo, "num_generations": n},
                                      kl={"coef": 0.1}, train={"batch_size": 4}))
    model = PolicyValueModel.from_config(cfg)
    model.trained_beta = 0.37
    rows = [{"prompt": "the cat sat"}, {"prompt": "once upon a time"}] * (2 // n)
    table = token_table(model, rows, cfg, seed=3)
    assert len(table) == 2 * n * (2 // n)
    batch = token_batch(model, rows, cfg, seed=3)
    fresh = dataclasses.replace(batch, rewards=None, advantages=None, returns=None)
    trainer = Trainer(cfg, model, rows)
    trainer.kl_ctl.value = 0.37
    used = trainer.learn(fresh).batch
    assert torch.allclose(batch.advantages, used.advantages, atol=1e-6)
    for i, s in enumerate(table):
        k = len(s["tokens"])
        assert s["advantage"] == pytest.approx(used.advantages[i, :k].tolist(), abs=1e-6)
    if algo == "grpo":  # group baselines: the advantages of each group sum to zero
        per_seq = used.advantages[:, 0]
        assert abs(float(per_seq[0] + per_seq[1])) < 1e-5



def test_planner_rows_skip_an_eval_of_another_model(tmp_path):
    """`dynalm eval --model M --out RUN/eval-x.json` writes a "model" side, not "trained": the
    run's report used to fail on it with KeyError 'trained' at the next `dynalm eval --run`."""
    from dynalm.report import planner_rows

    (tmp_path / "eval-best-of-n.json").write_text(json.dumps({"trained": {"planner": "best-of-n", "reward": 0.5, "env_steps": 12}}))
    (tmp_path / "eval-imagined.json").write_text(json.dumps({"model": {"planner": "sample", "reward": -0.2}}))
    cols, rows = planner_rows(tmp_path, {"trained": {"planner": "sample", "reward": 0.25, "kl": 1.0}})
    assert cols[0] == "planner"
    assert [r[0] for r in rows] == ["sample", "best-of-n"]
    assert [r[1] for r in rows] == [0.25, 0.5]
    assert rows[1][-1] == 12
