"""Data parallelism over 2 CPU processes (gloo), launched with `accelerate launch` as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dynalm
from dynalm.config import build_config
from dynalm.distributed import check_world, rank_seed
from dynalm.errors import UserError

from conftest import tiny_overrides

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

ROOT = Path(__file__).resolve().parents[1]
CPU_DDP = ROOT / "configs" / "accelerate" / "cpu_ddp.yaml"
TIMING = ("tokens_per_s",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*args, cwd) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/cpu_ddp.yaml ARGS` (2 processes)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    src = str(Path(dynalm.__file__).resolve().parents[1])  # this checkout's dynalm in the workers too
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
           "--main_process_port", str(_free_port()), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _metrics(run: Path) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time/") and k not in TIMING} for m in lines]


# ----------------------------------------------------------------------------- no launch


def test_batch_that_splits_a_prompt_group_is_refused(tiny_llama, prompts_file):
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                                      train={"batch_size": 6}))
    check_world(cfg, 1)
    check_world(cfg, 3)  # 3 prompts, one each
    with pytest.raises(UserError) as e:
        check_world(cfg, 2)
    assert e.value.line() == (
        "3 prompts per step (2 completions each) cannot be split evenly over 2 processes "
        "(make train.batch_size / algorithm.num_generations a multiple of 2, e.g. train.batch_size=8)"
    )


def test_rank_zero_keeps_the_seed():
    assert rank_seed(7, 0) == 7  # a 1-process run samples exactly as before
    assert len({rank_seed(7, r) for r in range(4)}) == 4


# ----------------------------------------------------------------------------- 2 processes


def test_two_process_update_equals_one_process_update(tiny_llama, tmp_path):
    """Same global batch: one process on all of it vs two on halves of different token counts."""
    out = tmp_path / "report.json"
    r = _launch(ROOT / "tests" / "dist_update_worker.py", tiny_llama, out, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [next(iter(rep.values()))["rank"] for rep in ranks] == [0, 1]
    uneven = 0
    for case in ranks[0]:
        a, b = ranks[0][case], ranks[1][case]
        assert a["params"] == b["params"], f"{case}: the processes' weights diverged"
        for rep in (a, b):
            # the update moved the weights, and by what one process moves them (float tolerance)
            assert rep["update_norm"] > 0.1, case
            assert rep["update_diff"] < 1e-5 * max(1.0, rep["update_norm"]), (case, rep["update_diff"])
            single, dist = rep["metrics_single"], rep["metrics_dist"]
            assert set(single) == set(dist), case
            for k, v in single.items():
                # clip fractions count tokens past a threshold: a float-level difference in the
                # ratio can move one token (~1/100 here) across it; every other metric is continuous
                tol = 0.02 if k.endswith("clipfrac") else 1e-5
                assert dist[k] == pytest.approx(v, rel=1e-4, abs=tol), (case, k)
            # the token-weighted gradient is the 1-process one
            assert rep["grad_diff_exact"] < 1e-5 * rep["grad_norm"], (case, rep["grad_diff_exact"])
        if a["tokens"] != b["tokens"]:
            uneven += 1  # ... where DDP's mean of per-process means is not
            assert a["grad_diff_ddp_mean"] > 1e-3 * a["grad_norm"], case
    assert uneven >= 1, "no case had processes with different token counts"


def test_accelerate_launch_train_writes_one_run_and_resumes(tiny_llama, tmp_path, prompts_file):
    """`accelerate launch -m dynalm train`: one run directory written by rank 0, the global
    batch logged, and a resumed run repeats the uninterrupted one."""
    raw = tiny_overrides(tiny_llama, prompts_file, train={"steps": 3, "batch_size": 4, "threads": 1},
                         algorithm={"name": "ppo", "minibatch_size": 2, "epochs": 2},
                         rewards=[{"name": "distinct1", "normalize": True}],
                         log={"samples_every": 1, "checkpoint_every": 1})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))

    full = tmp_path / "full"
    r = _launch("-m", "dynalm", "train", "-c", cfg, "--out", full, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(f"run directory: {full}") == 1
    assert "data-parallel: 2 processes on cpu, 2 completions each per step" in r.stdout
    assert "Traceback" not in r.stderr
    for name in ["config.yaml", "metrics.jsonl", "samples.jsonl", "eval.json", "report.md", "export/config.json"]:
        assert (full / name).exists(), name
    metrics = _metrics(full)
    assert [m["step"] for m in metrics] == [1, 2, 3]  # written once, not once per process
    samples = [json.loads(x) for x in (full / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4 + [3] * 4  # the whole global batch, from both processes
    assert sorted(p.name for p in (full / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    state = torch.load(full / "checkpoints" / "step-000003" / "state.pt", weights_only=False)
    assert len(state["ranks"]) == 2  # each process's rollout generator

    # As if killed after step 2's checkpoint: resume from it and step 3 comes out the same.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step-000003")
    (part / "checkpoints" / "latest").write_text("step-000002\n")
    conf = yaml.safe_load((part / "config.yaml").read_text())
    conf["eval"]["enabled"] = False  # eval comes after training: it changes no metric
    (part / "config.yaml").write_text(yaml.safe_dump(conf))
    r = _launch("-m", "dynalm", "train", "--resume", part, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("resuming") == 1
    assert _metrics(part) == metrics


def test_accelerate_launch_user_error_is_one_line(tiny_llama, tmp_path, prompts_file):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_overrides(tiny_llama, prompts_file, train={"batch_size": 3})))
    r = _launch("-m", "dynalm", "train", "-c", cfg, "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dynalm: error:")]
    assert lines == [
        "dynalm: error: 3 prompts per step cannot be split evenly over 2 processes "
        "(make train.batch_size / algorithm.num_generations a multiple of 2, e.g. train.batch_size=4)"
    ]
    assert not (tmp_path / "run").exists()
