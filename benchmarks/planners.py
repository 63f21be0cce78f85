"""Compare decoders on a trained run: sample, best-of-n and value-guided MCTS.

    python benchmarks/planners.py [--run runs/demo] [--prompts 20] [--simulations 10]
                                  [--variant NAME=PLANNER[,key=value...] ...]

best-of-n uses n = simulations, so both spend the same number of token forwards per
generated position (n candidates in one batch vs `simulations` single-token forwards).
Default variants: sample, best-of-n, mcts (the run's own planner settings) and mcts-reward
(planner.leaf=reward: leaves scored by the run's reward on the partial text). `--variant`
replaces them, e.g. `--variant mcts-t1=mcts,temperature=1`. `--prompts 0` uses the whole
eval split. `--equal-time VARIANT` adds the time-budget view: best-of-n again, with the n
whose measured cost per sample matches VARIANT's (n scaled by the ratio of the two times),
so the two are compared at equal wall time per sample. Writes benchmarks/results/NAME.json (default planners.json); the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_result  # noqa: E402

DEFAULT = ["sample=sample", "best-of-n=best-of-n", "mcts=mcts", "mcts-reward=mcts,leaf=reward"]


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    name, _, rest = spec.partition("=")
    planner, *sets = rest.split(",")
    return name, planner, [f"planner.{s}" for s in sets]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--simulations", type=int, default=10)
    ap.add_argument("--variant", action="append", default=None)
    ap.add_argument("--append", action="store_true", help="add these variants to the rows of the existing result file")
    ap.add_argument("--name", default="planners", help="result file: benchmarks/results/NAME.json")
    ap.add_argument("--equal-time", default=None, metavar="VARIANT",
                    help="add best-of-n with the n that costs what VARIANT costs per sample (needs a best-of-n variant)")
    ap.add_argument("--reuse", action="store_true",
                    help="read RUN/bench-VARIANT.json where it exists instead of evaluating again (same command earlier)")
    a = ap.parse_args()
    run = Path(a.run)
    rows, commands = [], ["python benchmarks/planners.py " + " ".join(sys.argv[1:])]
    if a.append:
        old = json.loads((RESULTS / f"{a.name}.json").read_text())
        if (old["run"], old["prompts"]) != (str(run), a.prompts):
            sys.exit(f"--append: the existing {a.name}.json measured another run or prompt count")
        rows = [r for r in old["rows"]]
        commands = old.get("commands", [old["command"]]) + commands
    elif a.reuse and (RESULTS / f"{a.name}.json").is_file():  # the commands that measured the reused files come first
        old = json.loads((RESULTS / f"{a.name}.json").read_text())
        commands = old.get("commands", [old["command"]]) + commands
    specs = list(a.variant or DEFAULT)
    i = 0
    while i < len(specs):
        spec = specs[i]
        i += 1
        name, planner, sets = parse_variant(spec)
        n_cand = next((int(x.split("=")[1]) for x in sets if x.startswith("planner.n=")), a.simulations)
        out = run / f"bench-{name}.json"
        cmd = [sys.executable, "-m", "dynalm", "eval", "--run", str(run), "--planner", planner, "--out", str(out),
               "--set", f"eval.max_prompts={a.prompts or 'null'}", "--set", f"planner.n={n_cand}",
               "--set", f"planner.simulations={a.simulations}"]
        for s in sets:
            cmd += ["--set", s]
        if not (a.reuse and out.is_file()):
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        full = json.loads(out.read_text())
        ev = full["trained"]
        # --reuse trusts that the file came from this command; it checks what the file records
        if ev["planner"] != planner or (a.prompts and full["n_prompts"] != a.prompts):
            sys.exit(f"{out} holds another planner or prompt count: run without --reuse")
        rows.append({"variant": name, "settings": sets, "n": n_cand if planner == "best-of-n" else None,
                     **{k: ev[k] for k in ("planner", "reward", "kl", "distinct2", "perplexity_ref", "seconds_per_sample", "forward_calls")},
                     **{k: ev[k] for k in ev if k.startswith("reward/")},
                     "sample_rewards": [x["reward"] for x in ev["samples"]]})
        print({k: v for k, v in rows[-1].items() if k != "sample_rewards"}, flush=True)
        if a.equal_time and i == len(specs) and not any(r["variant"].endswith("@equal-time") for r in rows):
            target = next((r for r in rows if r["variant"] == a.equal_time), None)
            bon = next((r for r in rows if r["planner"] == "best-of-n" and not r["settings"]), None)
            if target is None or bon is None:
                sys.exit(f"--equal-time {a.equal_time}: needs that variant and a plain best-of-n variant among the rows")
            # best-of-n's cost grows about linearly in n (one batch of n candidates)
            n_eq = max(1, round(a.simulations * target["seconds_per_sample"] / bon["seconds_per_sample"]))
            specs.append(f"best-of-n@equal-time=best-of-n,n={n_eq}")
    base = next((r for r in rows if r["planner"] == "sample"), rows[0])
    for r in rows:
        r["reward_gain_vs_sample"] = r["reward"] - base["reward"]
        r["time_ratio_vs_sample"] = r["seconds_per_sample"] / base["seconds_per_sample"]
        if "sample_rewards" in r and "sample_rewards" in base:  # same prompts, same order: paired
            r["prompts_better_than_sample"] = sum(x > y for x, y in zip(r["sample_rewards"], base["sample_rewards"]))
    write_result(a.name, {
        "command": " && ".join(commands), "commands": commands,
        "machine": machine(), "run": str(run), "prompts": a.prompts, "rows": rows,
    })
    print("| decoder | eval reward | Δ vs sample | prompts better | KL | distinct-2 | ppl (ref) | s / sample | × time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        better = f"{r['prompts_better_than_sample']}/{len(r['sample_rewards'])}" if "prompts_better_than_sample" in r else "–"
        print(f"| {r['variant']} | {r['reward']:.4f} | {r['reward_gain_vs_sample']:+.4f} | {better} | {r['kl']:.2f} | "
              f"{r['distinct2']:.3f} | {r['perplexity_ref']:.1f} | {r['seconds_per_sample']:.2f} | {r['time_ratio_vs_sample']:.1f} |")


if __name__ == "__main__":
    main()
