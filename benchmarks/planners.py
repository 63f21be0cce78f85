"""Compare decoders on a trained run: sample, best-of-n and value-guided MCTS.

    python benchmarks/planners.py [--run runs/demo] [--prompts 20] [--simulations 10]

best-of-n uses n = simulations, so both spend the same number of token forwards per
generated position (n candidates in one batch vs `simulations` single-token forwards).
Writes benchmarks/results/planners.json; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--simulations", type=int, default=10)
    a = ap.parse_args()
    run = Path(a.run)
    rows = []
    for planner in ["sample", "best-of-n", "mcts"]:
        out = run / f"bench-{planner}.json"
        cmd = [sys.executable, "-m", "dynalm", "eval", "--run", str(run), "--planner", planner, "--out", str(out),
               "--set", f"eval.max_prompts={a.prompts}", "--set", f"planner.n={a.simulations}",
               "--set", f"planner.simulations={a.simulations}"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ev = json.loads(out.read_text())["trained"]
        rows.append({k: ev[k] for k in ("planner", "reward", "kl", "distinct2", "seconds_per_sample", "forward_calls")})
        print(rows[-1], flush=True)
    base = rows[0]
    for r in rows:
        r["reward_gain_vs_sample"] = r["reward"] - base["reward"]
        r["time_ratio_vs_sample"] = r["seconds_per_sample"] / base["seconds_per_sample"]
    write_result("planners", {
        "command": f"python benchmarks/planners.py --run {a.run} --prompts {a.prompts} --simulations {a.simulations}",
        "machine": machine(), "run": str(run), "prompts": a.prompts, "rows": rows,
    })
    print("| planner | eval reward | Δ vs sample | KL | distinct-2 | s / sample | × time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['planner']} | {r['reward']:.4f} | {r['reward_gain_vs_sample']:+.4f} | {r['kl']:.2f} | "
              f"{r['distinct2']:.3f} | {r['seconds_per_sample']:.2f} | {r['time_ratio_vs_sample']:.1f} |")


if __name__ == "__main__":
    main()
