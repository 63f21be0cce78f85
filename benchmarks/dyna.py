"""Dyna vs plain training: true-reward calls needed to reach an eval reward target.

    python benchmarks/dyna.py [--seeds 0 1 2] [--steps 30] [--eval-every 5] [--eval-prompts 16] [--reuse OLD.json]
                              [--target-delta 0.10] [--true-fraction 0.25]

The story preset (configs/story.yaml) with its composite reward treated as the expensive
one. Per seed, two runs with identical settings except `dyna.enabled`: plain (every
completion scored by the true reward, 8 calls per step) and Dyna (a `true_fraction` share
scored, the learned reward model scoring the rest). Every `eval-every` steps the policy is
evaluated on the first `eval-prompts` held-out openings with the true reward (eval/reward
in metrics.jsonl); the final eval adds step 0 (the base model, same eval seed) and the
last step. The target is base + `target-delta`; a run's cost is the number of true-reward
calls made up to the first eval at or above it. Medians over seeds, and their ratio.

Writes benchmarks/results/dyna.json; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


def curve(run: Path) -> list[dict]:
    """(step, true-reward calls so far, eval reward) at step 0, each periodic eval and the end."""
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((run / "eval.json").read_text())
    pts = [{"step": 0, "calls": 0, "eval_reward": ev["base"]["reward"]}]
    pts += [{"step": m["step"], "calls": m["reward_calls"], "eval_reward": m["eval/reward"]} for m in metrics if "eval/reward" in m]
    last = metrics[-1]
    pts.append({"step": last["step"], "calls": last["reward_calls"], "eval_reward": ev["trained"]["reward"]})
    return pts


def calls_to(pts: list[dict], target: float) -> int | None:
    for p in pts:
        if p["eval_reward"] >= target:
            return p["calls"]
    return None


def median_calls(xs: list[int | None]) -> float | None:
    """Median with 'not reached' counted as larger than any reached value; None if the median itself was not reached."""
    vals = sorted(float("inf") if x is None else x for x in xs)
    m = statistics.median(vals)
    return None if m == float("inf") else m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--target-delta", type=float, default=0.10)
    ap.add_argument("--true-fraction", type=float, default=0.25)
    ap.add_argument("--set", action="append", default=[], help="extra overrides for both modes")
    ap.add_argument(
        "--reuse", default=None,
        help="a dyna.json whose (seed, mode) runs are taken instead of re-run (marked 'reused_from' in the result); "
        "e.g. plain runs, which no Dyna change touches",
    )
    a = ap.parse_args()
    old = {(r["seed"], r["mode"]): r for r in json.loads(Path(a.reuse).read_text())["runs"]} if a.reuse else {}
    argv = " ".join(sys.argv[1:])
    out = {
        "machine": machine(),
        "command": f"python benchmarks/dyna.py {argv}".strip(),
        "settings": vars(a),
        "runs": [],
    }
    for seed in a.seeds:
        for mode in ("plain", "dyna"):
            if (seed, mode) in old:
                out["runs"].append({**old[(seed, mode)], "reused_from": old[(seed, mode)].get("reused_from", a.reuse)})
                continue
            run = Path("runs") / f"bench-dyna-{mode}-s{seed}"
            sets = [
                f"seed={seed}", f"train.steps={a.steps}", f"eval.every={a.eval_every}", f"eval.max_prompts={a.eval_prompts}",
                "log.checkpoint_every=1000", f"dyna.enabled={'true' if mode == 'dyna' else 'false'}",
                f"dyna.true_fraction={a.true_fraction}", *a.set,
            ]
            cmd = [sys.executable, "-m", "dynalm", "train", "-c", "configs/story.yaml", "--out", str(run), "--force"]
            for s in sets:
                cmd += ["--set", s]
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            pts = curve(run)
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rec = {"seed": seed, "mode": mode, "wall_seconds": round(time.perf_counter() - t, 1), "curve": pts}
            corr = [m["dyna/model_corr_recent"] for m in metrics if "dyna/model_corr_recent" in m]
            if corr:
                rec["model_corr_recent_last"] = corr[-1]
                rec["model_rmse_recent_last"] = [m["dyna/model_rmse_recent"] for m in metrics if "dyna/model_rmse_recent" in m][-1]
            out["runs"].append(rec)
            write_result("dyna", out)
            print(json.dumps(rec), flush=True)

    base = statistics.median(r["curve"][0]["eval_reward"] for r in out["runs"])
    target = base + a.target_delta
    summary = {"base_eval_reward": base, "target": target}
    for mode in ("plain", "dyna"):
        rs = [r for r in out["runs"] if r["mode"] == mode]
        per_seed = [calls_to(r["curve"], target) for r in rs]
        summary[mode] = {
            "calls_to_target_per_seed": per_seed,
            "median_calls_to_target": median_calls(per_seed),
            "median_final_eval_reward": statistics.median(r["curve"][-1]["eval_reward"] for r in rs),
            "median_total_calls": statistics.median(r["curve"][-1]["calls"] for r in rs),
            "median_wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
        }
    p, d = summary["plain"]["median_calls_to_target"], summary["dyna"]["median_calls_to_target"]
    summary["calls_ratio_dyna_over_plain"] = (d / p) if (p and d) else None
    out["summary"] = summary
    path = write_result("dyna", out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
