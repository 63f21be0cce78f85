"""Lookahead inside a learned environment model against real-environment decoders, on one run.

    python benchmarks/lookahead.py --run runs/envmodel-guess --em runs/envmodel-guess-em [--n 4] [--depth 2] [--prompts 32]

On the same held-out episodes (the run's eval split, eval seed fixed) of a multi-turn
environment, the trained policy plays with:
- sample: one reply per turn (one real environment step per turn);
- best-of-n: `--n` replies per turn, each tried in a fork of the *real* environment, the best
  kept (n real steps per turn: the environment is the planner's model);
- lookahead: `--n` replies per turn, each played `--depth` turns inside the learned model
  (policy against model) and scored by the imagined return plus the critic's value at the
  horizon; only the chosen one is played for real (one real step per turn).
Lookahead and sample spend the same real steps; best-of-n spends n times as many. Reported:
mean return, success rate, real environment steps, imagined steps, seconds per episode and
the episodes where each beats sample (paired by seed). Writes benchmarks/results/NAME.json.
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


def evaluate(run: Path, planner: str, sets: list[str], out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "dynalm", "eval", "--run", str(run), "--planner", planner, "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["trained"], time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a trained run of a multi-turn environment")
    ap.add_argument("--em", required=True, help="an environment model folder (dynalm train-env-model)")
    ap.add_argument("--n", type=int, default=4, help="candidate replies per turn (best-of-n and lookahead)")
    ap.add_argument("--depth", type=int, default=2, help="imagined turns per lookahead candidate")
    ap.add_argument("--prompts", type=int, default=32, help="held-out episodes")
    ap.add_argument("--name", default=None, help="result file (default: lookahead-<run name>)")
    a = ap.parse_args()
    run = Path(a.run)
    common = [f"eval.max_prompts={a.prompts}", f"planner.n={a.n}"]
    variants = [
        ("sample", "sample", common),
        (f"best-of-{a.n} (real)", "best-of-n", common),
        (f"lookahead n={a.n} depth={a.depth}", "lookahead", common + [f"planner.depth={a.depth}", f"planner.env_model={a.em}"]),
    ]
    rows = []
    for name, planner, sets in variants:
        ev, wall = evaluate(run, planner, sets, run / f"bench-lookahead-{planner}.json")
        turns = sum(len([t for t in s["turns"] if t["role"] == "assistant"]) for s in ev["samples"])
        rows.append({
            "variant": name, "planner": planner, "settings": sets, "return": ev["reward"], "success_rate": ev.get("success_rate"),
            "turns_per_episode": ev.get("turns_per_episode"),
            "real_env_steps": ev.get("env_steps", turns),  # sampling: one real step per assistant turn
            "imagined_steps": ev.get("imagined_steps", 0), "seconds_per_episode": ev["seconds_per_sample"], "wall_seconds": round(wall, 1),
            "returns": [s["reward"] for s in ev["samples"]],
        })
        print({k: v for k, v in rows[-1].items() if k != "returns"}, flush=True)
    base = rows[0]
    for r in rows:
        r["return_gain_vs_sample"] = r["return"] - base["return"]
        r["episodes_better_than_sample"] = sum(x > y for x, y in zip(r["returns"], base["returns"]))
        r["episodes_worse_than_sample"] = sum(x < y for x, y in zip(r["returns"], base["returns"]))
    name = a.name or f"lookahead-{run.name}"
    p = write_result(name, {"command": "python benchmarks/lookahead.py " + " ".join(sys.argv[1:]), "machine": machine(),
                            "run": str(run), "env_model": a.em, "prompts": a.prompts, "rows": rows})
    print(f"machine: {machine()}; {a.prompts} held-out episodes of {run}")
    print("| decoder | mean return | Δ vs sample | better / worse than sample | success | real env steps | imagined steps | s / episode |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = "–" if r["success_rate"] is None else f"{100 * r['success_rate']:.1f} %"
        print(f"| {r['variant']} | {r['return']:.3f} | {r['return_gain_vs_sample']:+.3f} | {r['episodes_better_than_sample']} / "
              f"{r['episodes_worse_than_sample']} | {s} | {r['real_env_steps']} | {r['imagined_steps']} | {r['seconds_per_episode']:.2f} |")
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
