"""A critic started from a reward model trained on prefixes of rated rollouts (issue 14).

    python benchmarks/critic_init.py --config configs/sentiment.yaml [--prompts 128] [--per-prompt 4]
                                     [--prefixes 4] [--epochs 2] [--steps 20] [--set k=v ...] [--name NAME]

OpenRLHF and PPO-MCTS start the critic from a reward model; a reward model trained on finished
text alone has never seen a state, so this one is also trained on prefixes of each rated
completion with the completion's reward as the target (`dynalm train-rm --set prefixes=K`,
the Monte-Carlo value of the state the cut leaves). Four phases, each timed:

1. `dynalm rollouts`: `--per-prompt` completions of the first `--prompts` *training* prompts
   from the config's untrained policy, scored with its reward, written as rated completions
   (`runs/critic_init-NAME/rollouts.jsonl`, each prompt with the task template applied, so the
   reward model reads the policy's own state);
2. `dynalm train-rm` on them with `prefixes=K` (10 % of the rollouts held out, with their
   prefixes: the reward model's R² on held-out states before any RL step);
3. `dynalm train` of the config with `model.critic=model`, `model.critic_init=` that folder;
4. `benchmarks/value_probe.py` on that run (held-out eval prompts, 2 rollouts each).

Writes benchmarks/results/critic_init-NAME.json (and value_probe-critic_init-NAME.json).
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


def dynalm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dynalm", *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/sentiment.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override for the rollouts and the run")
    ap.add_argument("--prompts", type=int, default=128, help="training prompts to roll out")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()

    name = a.name or Path(a.config).stem
    root = Path("runs") / f"critic_init-{name}"
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    dynalm("rollouts", "-c", a.config, *[x for s in a.set for x in ("--set", s)], "--out", str(root / "rollouts.jsonl"),
           "--prompts", str(a.prompts), "--per-prompt", str(a.per_prompt), "--batch", str(a.batch), "--seed", str(a.seed), "--force")
    n = len((root / "rollouts.jsonl").read_text().splitlines())
    seconds["rollouts"] = time.perf_counter() - t

    t = time.perf_counter()
    dynalm("train-rm", "--data", str(root / "rollouts.jsonl"), "--out", str(root / "rm"),
           "--set", f"prefixes={a.prefixes}", "--set", f"epochs={a.epochs}",
           "--set", f"seed={a.seed}")
    seconds["train_rm"] = time.perf_counter() - t
    rm = json.loads((root / "rm" / "reward_model.json").read_text())["metrics"]

    t = time.perf_counter()
    run = root / "run"
    sets = [*a.set, "model.critic=model", f"model.critic_init={root / 'rm'}", f"train.steps={a.steps}", "log.progress=false"]
    dynalm("train", "-c", a.config, "--out", str(run), "--force", *[x for s in sets for x in ("--set", s)])
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    probe_name = f"value_probe-critic_init-{name}"
    subprocess.run([sys.executable, "benchmarks/value_probe.py", "--run", str(run), "--per-prompt", "2", "--name", probe_name], check=True)
    seconds["value_probe"] = time.perf_counter() - t
    probe = json.loads((Path(__file__).parent / "results" / f"{probe_name}.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    res = {
        "command": "python benchmarks/critic_init.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "config": a.config, "set": a.set, "rollouts": n, "prefixes": a.prefixes, "epochs": a.epochs, "steps": a.steps,
        "reward_model": rm, "run": str(run),
        "eval_reward": {"base": ev["base"]["reward"], "trained": ev["trained"]["reward"]},
        "probe": {"r2_critic": probe["r2_critic"], "by_depth": probe["by_depth"]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    p = write_result(f"critic_init-{name}", res)
    held = rm.get("prefix_after", {})
    print(f"machine: {res['machine']}; reward model on held-out prefixes: r {held.get('pearson')}, mse {held.get('mse')}")
    for row in probe["by_depth"]:
        print(f"  {row['depths']:>10}: critic R² {row['r2_critic']}")
    print(f"eval reward {res['eval_reward']}; seconds {res['seconds']}; wrote {p}")


if __name__ == "__main__":
    main()
