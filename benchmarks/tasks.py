"""Train each task preset on the embedded model and record base vs trained eval.

    python benchmarks/tasks.py [--tasks sentiment translation poem] [--set key=value ...] [--name tasks]

Writes benchmarks/results/NAME.json (tasks.json by default); the README's task table quotes
it. `--tasks dialog --name dialog` measures the dialog preset (a sample eval conversation
from each side is kept in the result); `--tasks guess calculator --name envs` the two example
environments (mean return, success rate, turns per episode).
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

KEYS = ["reward", "kl", "distinct2", "self_bleu", "mean_length", "eos_rate", "reward/repetition",
        "turns_per_episode", "success_rate", "truncated_rate"]  # the last three: multi-turn environments


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", nargs="+", default=["sentiment", "translation", "poem"])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--name", default="tasks", help="result file name (benchmarks/results/NAME.json)")
    a = ap.parse_args()
    out = {"machine": machine(), "command": "python benchmarks/tasks.py " + " ".join(sys.argv[1:]), "tasks": {}}
    for task in a.tasks:
        run = Path("runs") / f"bench-{task}"
        cmd = [sys.executable, "-m", "dynalm", "train", "-c", f"configs/{task}.yaml", "--out", str(run), "--force"]
        for s in a.set:
            cmd += ["--set", s]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        ev = json.loads((run / "eval.json").read_text())
        terms = [k for k in ev["base"] if k.startswith("reward/")]
        out["tasks"][task] = {
            "wall_seconds": round(time.perf_counter() - t, 1),
            "eval_prompts": ev["n_prompts"],
            "base": {k: ev["base"][k] for k in KEYS + terms if k in ev["base"]},
            "trained": {k: ev["trained"][k] for k in KEYS + terms if k in ev["trained"]},
        }
        tr = run / "transcripts.jsonl"
        if tr.is_file():  # dialog: the first eval conversation of each side
            lines = [json.loads(x) for x in tr.read_text().splitlines()]
            out["tasks"][task]["sample_conversations"] = [t for t in lines if t["episode"] == 0]
        write_result(a.name, out)
        print(task, json.dumps(out["tasks"][task]), flush=True)


if __name__ == "__main__":
    main()
