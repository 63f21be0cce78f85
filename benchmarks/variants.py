"""Train one preset with each algorithm variant and tabulate eval reward, share of steps
without a gradient signal, KL, mean length and wall time.

    python benchmarks/variants.py [--task sentiment] [--seeds 0 1 2] [--steps 40] [--only grpo dr_grpo ...]
                                  [--set generation.max_new_tokens=24 ...] [--tag short]

Every variant runs the same preset with `algorithm.epochs: 2` (so that the ratio and its
clipping matter: with one epoch and one minibatch every ratio is exactly 1) and, for the
group methods, 4 completions per prompt. Writes benchmarks/results/variants-TASK.json and
prints a Markdown table (mean ± half the spread over seeds). "No-signal steps" are the
steps whose every prompt group scored alike (groups/zero_std_frac = 1) for group methods,
or whose batch reward std was 0 otherwise. `--set` overrides go to every run (e.g. shorter
completions, so that 3 seeds of 40 steps fit a 2-core machine); with `--tag T` the results
go to variants-TASK-T.json instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402

GROUP = ["algorithm.name=grpo", "algorithm.num_generations=4"]
VARIANTS = {
    "grpo": GROUP,
    "dr_grpo": GROUP + ["algorithm.loss_agg=constant", "algorithm.scale_rewards=false"],
    "gspo": GROUP + ["algorithm.importance_sampling=sequence", "algorithm.loss_agg=sequence_mean", "algorithm.clip_range=0.004"],
    "dapo": GROUP + ["algorithm.clip_range_high=0.28", "algorithm.dynamic_sampling=true"],
    "rloo": ["algorithm.name=rloo", "algorithm.num_generations=4"],
    "reinforce_pp": ["algorithm.name=reinforce_pp"],
    "ppo": ["algorithm.name=ppo"],
}


def one(task: str, name: str, seed: int, steps: int, extra: list[str]) -> dict:
    run = Path("runs") / f"var-{task}-{name}-s{seed}"
    cmd = [sys.executable, "-m", "dynalm", "train", "-c", f"configs/{task}.yaml", "--out", str(run), "--force",
           "--set", f"seed={seed}", "--set", f"train.steps={steps}", "--set", "algorithm.epochs=2", "--set", "log.progress=false"]
    for s in extra + VARIANTS[name]:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    ev = json.loads((run / "eval.json").read_text())
    ms = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    flat = [m.get("groups/zero_std_frac", 1.0 if m["reward_std"] == 0 else 0.0) >= 1.0 for m in ms]
    return {
        "seed": seed, "wall_seconds": round(wall, 1), "eval_base": ev["base"]["reward"], "eval_trained": ev["trained"]["reward"],
        "kl": ev["trained"]["kl"], "mean_length": ev["trained"]["mean_length"], "no_signal_steps": sum(flat) / len(flat),
        "flat_group_share": sum(m.get("groups/zero_std_frac", 0.0) for m in ms) / len(ms),
    }


def _ms(xs: list[float], digits: int) -> str:
    m = sum(xs) / len(xs)
    return f"{m:.{digits}f}" + (f" ± {(max(xs) - min(xs)) / 2:.{digits}f}" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--only", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override for every run (repeatable)")
    ap.add_argument("--tag", default="", help="result file suffix: variants-TASK-TAG.json")
    ap.add_argument("--append", action="store_true", help="add to the task's existing result file (same --steps and --set)")
    a = ap.parse_args()
    cmd = "python benchmarks/variants.py " + " ".join(sys.argv[1:])
    stem = f"variants-{a.task}" + (f"-{a.tag}" if a.tag else "")
    path = Path(__file__).parent / "results" / f"{stem}.json"
    out = {"machine": machine(), "commands": [cmd], "task": a.task, "steps": a.steps, "sets": a.sets, "variants": {}}
    if a.append and path.is_file():
        out = json.loads(path.read_text())
        out.setdefault("commands", [out.pop("command")] if "command" in out else []).append(cmd)
        if out["steps"] != a.steps or out.get("sets", []) != a.sets:
            sys.exit(f"variants.py: error: {path} holds {out['steps']}-step runs with --set {out.get('sets', [])}, "
                     f"not {a.steps} with {a.sets}")
    for name in a.only:
        out["variants"][name] = {"sets": VARIANTS[name], "machine": machine(), "runs": []}
        for seed in a.seeds:  # written after every run, so an interrupted table keeps what finished
            out["variants"][name]["runs"].append(one(a.task, name, seed, a.steps, a.sets))
            write_result(stem, out)
        print(name, json.dumps(out["variants"][name]["runs"]), flush=True)
    print(f"\n| variant | eval reward (base → trained) | no-signal steps | flat groups | KL | mean length | wall |")
    print("|---|---|---|---|---|---|---|")
    for name, v in out["variants"].items():
        r = v["runs"]
        col = lambda k, d=3: _ms([x[k] for x in r], d)  # noqa: E731
        print(f"| {name} | {col('eval_base')} → {col('eval_trained')} | {col('no_signal_steps', 2)} | "
              f"{col('flat_group_share', 2)} | {col('kl', 2)} | {col('mean_length', 1)} | {col('wall_seconds', 0)} s |")


if __name__ == "__main__":
    main()
