"""Train the environment of the README's "Bring your own environment" section, taken from
the README itself (the code block starting `# my_env.py`), as a new user would.

    python benchmarks/readme_env.py [--algo grpo] [--steps 20] [--set key=value ...] [--name NAME]

Writes benchmarks/results/readme_env-ALGO.json (or NAME.json): base → trained mean return, success rate
and turns per episode on 32 held-out seeds, with the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--algo", default="grpo", choices=["grpo", "ppo", "rloo", "reinforce_pp"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--name", default=None, help="result name (default readme_env-ALGO)")
    a = ap.parse_args()
    name = a.name or f"readme_env-{a.algo}"
    work = ROOT / "runs" / name.replace("_", "-")
    work.mkdir(parents=True, exist_ok=True)
    block = re.search(r"```python\n# my_env.py\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL).group(1)
    (work.parent / "readme_my_env.py").write_text(block)
    group = a.algo in ("grpo", "rloo")
    cfg = {
        "task": "readme-env", "seed": 0,
        "model": {"name": "smollm2-135m-instruct", "lora": {"enabled": True, "r": 16, "alpha": 32}, "max_prompt_tokens": 256},
        "env": {"kind": "custom", "factory": f"{work.parent / 'readme_my_env.py'}:make_env", "max_turns": 5, "transcripts": 4},
        "generation": {"max_new_tokens": 8, "temperature": 1.0},
        "kl": {"coef": 0.05},
        "algorithm": {"name": a.algo, "num_generations": 4 if group else 1},
        "train": {"steps": a.steps, "batch_size": 8, "learning_rate": 1.0e-3},
        "log": {"samples_every": 5, "checkpoint_every": a.steps, "progress": False},
        "eval": {"max_prompts": 32, "batch_size": 32},
    }
    cfg_path = work.parent / f"{work.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "dynalm", "train", "-c", str(cfg_path), "--out", str(work), "--force"]
    for s in a.set:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    ev = json.loads((work / "eval.json").read_text())
    keys = ["reward", "success_rate", "turns_per_episode", "truncated_rate", "kl", "mean_length"]
    out = {"machine": machine(), "command": "python benchmarks/readme_env.py " + " ".join(sys.argv[1:]), "config": cfg,
           "wall_seconds": round(time.perf_counter() - t, 1), "eval_episodes": ev["n_prompts"],
           "base": {k: ev["base"].get(k) for k in keys}, "trained": {k: ev["trained"].get(k) for k in keys}}
    out["set"] = a.set
    write_result(name, out)
    print(json.dumps(out["base"]), "->", json.dumps(out["trained"]))


if __name__ == "__main__":
    main()
