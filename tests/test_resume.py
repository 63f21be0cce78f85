"""Resume from a checkpoint reproduces the uninterrupted run (timings aside)."""

import json

from dynalm.config import build_config
from dynalm.run import train

from conftest import tiny_overrides

TIMING = ("time/", "tokens_per_s")


def _metrics(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_resume_matches_uninterrupted(tiny_llama, prompts_file, tmp_path):
    base = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "ppo", "epochs": 2, "minibatch_size": 2},
                          eval={"enabled": False}, log={"checkpoint_every": 2})
    full = train(build_config({**base, "train": {**base["train"], "steps": 5}}), tmp_path / "full", echo=lambda s: None)

    part_cfg = build_config({**base, "train": {**base["train"], "steps": 3}})
    part = train(part_cfg, tmp_path / "part", echo=lambda s: None)  # checkpoints at 2 and (final) 3
    # make the run look interrupted after step 3's metrics but before its checkpoint: drop step-3 checkpoint
    import shutil

    shutil.rmtree(part / "checkpoints" / "step-000003")
    (part / "checkpoints" / "latest").write_text("step-000002\n")
    cfg_text = (part / "config.yaml").read_text().replace("steps: 3", "steps: 5")
    (part / "config.yaml").write_text(cfg_text)
    msgs = []
    train(None, resume=part, echo=msgs.append)
    assert msgs[0].startswith(f"resuming {part} from step-000002 (step 2)")
    assert _metrics(part) == _metrics(full)


def test_resume_follows_an_edited_learning_rate(tiny_llama, prompts_file, tmp_path):
    """After a NaN stop the advice is: lower train.learning_rate in config.yaml and resume."""
    base = tiny_overrides(tiny_llama, prompts_file, eval={"enabled": False}, log={"checkpoint_every": 1})
    run = train(build_config({**base, "train": {**base["train"], "steps": 2}}), tmp_path / "r", echo=lambda s: None)
    text = (run / "config.yaml").read_text().replace("steps: 2", "steps: 3").replace("learning_rate: 0.01", "learning_rate: 0.001")
    (run / "config.yaml").write_text(text)
    train(None, resume=run, echo=lambda s: None)
    lrs = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [0.01, 0.01, 0.001]
