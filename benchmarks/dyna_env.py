"""Dyna with a learned environment model vs plain training: real environment steps to a target return.

    python benchmarks/dyna_env.py [--config configs/guess.yaml] [--seeds 0 1 2] [--steps 20] [--eval-every 5]
                                  [--env-model online] [--imagined-fraction 0.5] [--target-delta 0.2]

Per seed, two runs of a multi-turn preset with identical settings except `dyna`: plain
(every episode in the real environment) and Dyna (`dyna.env_model`, `online` by default:
learned from the run's own real transitions as they arrive, so every real step it uses is
counted; `imagined_fraction` of each step's episode groups played inside it). Every
`eval-every` steps the policy is evaluated on the preset's held-out episodes in the real
environment (eval/reward); the final eval adds step 0 (the base model, same eval seed).
A run's cost is the real environment steps (assistant turns) taken up to the first eval at
or above base + `target-delta`; eval episodes are not counted on either side.
Writes benchmarks/results/dyna_env-NAME.json. `--merge A B C --name N` runs nothing: it puts
the runs of dyna_env-A/B/C.json (seeds run apart) into one table, dyna_env-N.json.
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
from common import RESULTS, machine, write_result  # noqa: E402


def curve(run: Path, episodes_per_step: int) -> list[dict]:
    """(step, real environment steps so far, eval return) at step 0, each periodic eval and the end."""
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((run / "eval.json").read_text())
    real, pts = 0.0, [{"step": 0, "real_steps": 0, "eval_return": ev["base"]["reward"]}]
    for m in metrics:
        real = m["dyna/real_steps"] if "dyna/real_steps" in m else real + m["episode/turns"] * episodes_per_step
        if "eval/reward" in m:
            pts.append({"step": m["step"], "real_steps": round(real), "eval_return": m["eval/reward"]})
    if pts[-1]["step"] != metrics[-1]["step"]:
        pts.append({"step": metrics[-1]["step"], "real_steps": round(real), "eval_return": ev["trained"]["reward"]})
    return pts


def to_target(pts: list[dict], target: float) -> int | None:
    return next((p["real_steps"] for p in pts if p["eval_return"] >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/guess.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--env-model", default="online", help="dyna.env_model: online or a train-env-model folder")
    ap.add_argument("--imagined-fraction", type=float, default=0.5)
    ap.add_argument("--target-delta", type=float, default=0.2)
    ap.add_argument("--name", default=None, help="result name (default: the config's stem)")
    ap.add_argument("--merge", nargs="+", metavar="NAME", help="no runs: one table from dyna_env-NAME.json files, as --name")
    a = ap.parse_args()
    if a.merge:
        return merge(a.merge, a.name or "merged", a.target_delta)
    from dynalm.config import load_config

    episodes = load_config(a.config).train.batch_size
    name = a.name or Path(a.config).stem
    out: dict = {"command": "python benchmarks/dyna_env.py " + " ".join(sys.argv[1:]), "machine": machine(), "config": a.config,
                 "steps": a.steps, "env_model": a.env_model, "imagined_fraction": a.imagined_fraction, "runs": []}
    for seed in a.seeds:
        for side in ("plain", "dyna"):
            run = Path("runs") / f"dyna_env-{name}-{side}-{seed}"
            sets = [f"seed={seed}", f"train.steps={a.steps}", f"eval.every={a.eval_every}", "log.progress=false"]
            if side == "dyna":
                sets += ["dyna.enabled=true", f"dyna.env_model={a.env_model}", f"dyna.imagined_fraction={a.imagined_fraction}"]
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "dynalm", "train", "-c", a.config, "--out", str(run), "--force",
                            *[x for s in sets for x in ("--set", s)]], check=True, stdout=subprocess.DEVNULL)
            pts = curve(run, episodes)
            rec = {"seed": seed, "side": side, "run": str(run), "seconds": round(time.perf_counter() - t, 1), "curve": pts}
            out["runs"].append(rec)
            print({k: v for k, v in rec.items() if k != "run"}, flush=True)
            write_result(f"dyna_env-{name}", out)  # after every run: an interrupted table keeps what finished
    report(out, a.target_delta, name)


def report(out: dict, target_delta: float, name: str) -> None:
    """Summary per side over the seeds in `out["runs"]` (medians), written and printed."""
    sides = {side: [r for r in out["runs"] if r["side"] == side] for side in ("plain", "dyna")}
    base = statistics.median(r["curve"][0]["eval_return"] for r in out["runs"])
    target = base + target_delta
    summary = {}
    for side, recs in sides.items():
        costs = [to_target(r["curve"], target) for r in recs]
        reached = [c for c in costs if c is not None]
        summary[side] = {"seeds": [r["seed"] for r in recs], "real_steps_to_target": costs,
                         "median_real_steps_to_target": statistics.median(reached) if len(reached) * 2 > len(costs) else None,
                         "final_eval_return": [r["curve"][-1]["eval_return"] for r in recs],
                         "median_final_eval_return": statistics.median(r["curve"][-1]["eval_return"] for r in recs),
                         "real_steps_total": [r["curve"][-1]["real_steps"] for r in recs],
                         "median_seconds": statistics.median(r["seconds"] for r in recs)}
    out.update({"base_eval_return": base, "target": target, "summary": summary})
    p = write_result(f"dyna_env-{name}", out)
    print(f"machine: {out['machine']}; target = base {base:.3f} + {target_delta} = {target:.3f}")
    print("| | " + " | ".join(sides) + " |\n|---|---|---|")
    for key in ("seeds", "real_steps_to_target", "median_real_steps_to_target", "real_steps_total", "final_eval_return",
                "median_seconds"):
        print(f"| {key} | " + " | ".join(str(summary[s][key]) for s in sides) + " |")
    print(f"wrote {p}")


def merge(names: list[str], out_name: str, target_delta: float) -> None:
    """One table from several result files of this benchmark (e.g. one seed each, run apart)."""
    parts = [json.loads((RESULTS / f"dyna_env-{n}.json").read_text()) for n in names]
    out = {k: parts[0][k] for k in ("config", "steps", "env_model", "imagined_fraction")}
    for k in out:
        if any(q[k] != out[k] for q in parts):
            sys.exit(f"dyna_env-{names[0]} and the others differ in {k}: they do not make one table")
    out = {"command": "python benchmarks/dyna_env.py " + " ".join(sys.argv[1:]),
           "machine": sorted({q["machine"] for q in parts}), "merged_from": [q["command"] for q in parts], **out,
           "runs": [r for q in parts for r in q["runs"]]}
    report(out, target_delta, out_name)

if __name__ == "__main__":
    main()
