"""dynalm's side of benchmarks/perf.py: one timed `grpo` or `ppo` run through dynalm's own
training entry point (`dynalm.run.train`, what `dynalm train` calls), on the work in WORK.json.

    python benchmarks/dynalm_side.py --algo ppo --work WORK.json --out RESULT.json

Phases come from dynalm's metrics.jsonl (time/rollout, time/reward, time/reference,
time/update). Three hooks add what the metrics lack, and change nothing that is timed:
  - `Trainer.step` is wrapped to stamp each step's end (wall time between step ends, as the
    TRL side measures) and the process's peak RSS so far;
  - `dynalm.rl.trainer.update` is wrapped to record the batch's shape (rows, prompt width,
    decode steps, real tokens) for the FLOP and bandwidth arithmetic in perf.py, and the raw
    prompts, checked against WORK.json so both sides saw the same prompts in the same order;
  - the end-of-run export and report (a merged copy of the model, outside the steps) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def build_cfg(work: dict, algo: str, out: Path):
    from dynalm.config import build_config

    g, p = work["grpo"], work["ppo"]
    if algo == "grpo":
        algorithm = {"name": "grpo", "num_generations": g["num_generations"], "epochs": 1, "minibatch_size": work["batch"],
                     "clip_range": g["clip"], "scale_rewards": True}
        kl = {"coef": g["beta"], "estimator": "k3"}
        value_head = False
    else:
        algorithm = {"name": "ppo", "num_generations": 1, "epochs": 1, "minibatch_size": work["batch"],
                     "clip_range": p["clip"], "clip_range_value": p["clip_value"], "vf_coef": p["vf_coef"],
                     "gamma": 1.0, "lam": p["lam"], "advantage": "gae", "whiten_advantages": True}
        kl = {"coef": p["kl_coef"], "estimator": "k1"}
        value_head = None  # ppo: the value head on the policy's trunk
    raw = {
        "task": "perf",
        "seed": work["seed"],
        "model": {"name": work["model_name"], "value_head": value_head,
                  "lora": {"enabled": True, "r": work["lora_r"], "alpha": work["lora_alpha"]}},
        "data": {"train": work["data"], "eval": None, "template": work["template"]},
        "generation": {"max_new_tokens": work["max_new_tokens"], "temperature": 1.0, "top_p": 1.0},
        "rewards": [{"name": "sentiment", "weight": 1.0}],
        "kl": kl,
        "algorithm": algorithm,
        "train": {"steps": len(work["steps"]), "batch_size": work["batch"], "learning_rate": work["lr"],
                  "threads": work["threads"]},
        "log": {"samples_every": 10**6, "checkpoint_every": 10**6, "tensorboard": False},
        "eval": {"enabled": False},
    }
    from dynalm.config import deep_merge, parse_set

    return build_config(deep_merge(raw, parse_set(work.get("dynalm_set"))))  # perf.py --dynalm-set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", choices=["grpo", "ppo"], required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True, help="result JSON")
    a = ap.parse_args()
    work = json.loads(Path(a.work).read_text())

    import torch

    import dynalm
    import dynalm.rl.trainer as trainer_mod
    import dynalm.run as run_mod

    run_dir = Path(a.out).with_suffix(".d")
    cfg = build_cfg(work, a.algo, run_dir)

    ends: list[dict] = []
    shapes: list[dict] = []
    state = {"last": None}
    orig_step = trainer_mod.Trainer.step

    def step(self):
        if state["last"] is None:
            state["last"] = time.perf_counter()
        res = orig_step(self)
        now = time.perf_counter()
        ends.append({"step_s": now - state["last"], "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        state["last"] = now
        return res

    orig_update = trainer_mod.update

    def update(model, opt, batch, *args, **kw):
        shapes.append({
            "rows": int(batch.input_ids.shape[0]),
            "seq_width": int(batch.input_ids.shape[1]),
            "decode_steps": int(batch.action_mask.shape[1]),
            "real_tokens": int(batch.attention_mask.sum()),
            "completion_tokens": int(batch.action_mask.sum()),
            "prompts": list(batch.prompts),
        })
        return orig_update(model, opt, batch, *args, **kw)

    trainer_mod.Trainer.step = step
    trainer_mod.update = update
    run_mod.export_model = lambda *a, **k: None
    run_mod.finalize_report = lambda *a, **k: None

    t0 = time.perf_counter()
    run_mod.train(cfg, run_dir, force=True, echo=lambda s: print(s, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0

    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if not (len(metrics) == len(ends) == len(shapes) == len(work["steps"])):
        raise SystemExit(f"bookkeeping mismatch: {len(metrics)} metrics lines, {len(ends)} steps, {len(shapes)} updates")
    for i, (sh, want) in enumerate(zip(shapes, work["steps"]), start=1):
        got = sh.pop("prompts")
        expect = [r["prompt"] for r in want for _ in range(len(got) // len(want))]
        if got != expect:
            raise SystemExit(f"step {i}: dynalm sampled prompts {got[:2]}..., perf.py expected {expect[:2]}...")
    steps = []
    for i, (m, e, sh) in enumerate(zip(metrics, ends, shapes), start=1):
        steps.append({
            "step": i,
            "step_s": e["step_s"],
            "trainer_step_s": m["time/step"],
            "generation_s": m["time/rollout"],
            "reward_s": m["time/reward"],
            "reference_s": m["time/reference"],  # reference log-probs + per-token rewards + advantages
            "trainer_update_s": m["time/update"],
            "reward": m["reward"],
            "completion_len": m["completion_len"],
            "rss_mb": e["rss_mb"],
            **sh,
        })
    out = {
        "side": f"dynalm-{a.algo}",
        "versions": {"dynalm": getattr(dynalm, "__version__", "?"), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__},
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "peak_rss_mb": max(e["rss_mb"] for e in ends),
        "steps": steps,
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"dynalm {a.algo}: {len(steps)} steps in {wall:.1f}s, peak RSS {out['peak_rss_mb']:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
