"""Run the README's demo (story task, embedded model) and record wall time and eval numbers.

    python benchmarks/demo.py [--out runs/demo] [--set key=value ...]

Writes benchmarks/results/demo.json; the README quotes it.
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


def opening_ngram_share(samples: list[dict], n: int = 4) -> float:
    """Mean over samples of the share of the opening's word n-grams that reappear in the continuation."""
    from dynalm.rewards.text import ngrams, words

    shares = []
    for s in samples:
        grams = set(ngrams(words(s["prompt"]), n))
        if grams:
            shares.append(len(grams & set(ngrams(words(s["completion"]), n))) / len(grams))
    return sum(shares) / max(len(shares), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--config", default="configs/story.yaml")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--name", default="demo", help="results file: benchmarks/results/NAME.json")
    a = ap.parse_args()
    cmd = [sys.executable, "-m", "dynalm", "train", "--config", a.config, "--out", a.out, "--force"]
    for s in a.set:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    run = Path(a.out)
    ev = json.loads((run / "eval.json").read_text())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    med = sorted(m["time/step"] for m in metrics)[len(metrics) // 2]
    keys = ["reward"] + sorted(k for k in ev["base"] if k.startswith("reward/")) + [
        "kl", "perplexity_ref", "distinct2", "mean_length", "eos_rate"]
    for side in ("base", "trained"):  # issue 20: how much of the opening the continuations restate
        ev[side]["opening_4grams_reproduced"] = opening_ngram_share(ev[side]["samples"])
    keys.append("opening_4grams_reproduced")
    res = {
        "command": " ".join(["python", "benchmarks/demo.py"] + [f"--set {s}" for s in a.set]
                            + ([f"--name {a.name}"] if a.name != "demo" else [])),
        "machine": machine(),
        "wall_seconds": round(wall, 1),
        "steps": len(metrics),
        "median_step_seconds": round(med, 2),
        "eval_prompts": ev["n_prompts"],
        "base": {k: ev["base"][k] for k in keys if k in ev["base"]},
        "trained": {k: ev["trained"][k] for k in keys if k in ev["trained"]},
        "delta_reward": ev["delta_reward"],
        "samples": [
            {"prompt": b["prompt"], "base": b["completion"], "trained": tr["completion"]}
            for b, tr in list(zip(ev["base"]["samples"], ev["trained"]["samples"]))[:3]
        ],
    }
    write_result(a.name, res)
    print(json.dumps({k: res[k] for k in ("wall_seconds", "steps", "median_step_seconds", "delta_reward")}, indent=2))


if __name__ == "__main__":
    main()
