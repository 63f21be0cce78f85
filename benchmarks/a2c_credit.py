"""TD(0) vs GAE for a2c when the reward comes only at the end of the sequence.

    python benchmarks/a2c_credit.py [--steps 100]

A tiny random-init Llama-like model (tests/conftest.py) learns a user reward: the share of
generated words that are 'yes' (chance ≈ 1/37). Same seed, same everything but
algorithm.advantage. Writes benchmarks/results/a2c_credit.json; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import machine, write_result  # noqa: E402
from conftest import make_tiny_model, tiny_overrides  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    from dynalm.config import build_config
    from dynalm.run import train

    d = Path(tempfile.mkdtemp())
    model = make_tiny_model(d / "model", "llama")
    prompts = d / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "{w} the cat sat on"}}\n' for w in ["once", "a", "the", "big", "red", "small"]))
    rf = d / "r.py"
    rf.write_text("def yes_share(prompts, completions, **kw):\n"
                  "    return [sum(x == 'yes' for x in c.split()) / max(len(c.split()), 1) for c in completions]\n")
    out = {"machine": machine(), "command": f"python benchmarks/a2c_credit.py --steps {a.steps}", "runs": {}}
    for adv in ["td", "gae"]:
        cfg = build_config(tiny_overrides(
            model, prompts, algorithm={"name": "a2c", "advantage": adv}, rewards=[{"name": f"{rf}:yes_share"}],
            generation={"max_new_tokens": 6, "stop_at_eos": False},
            train={"steps": a.steps, "batch_size": 16, "learning_rate": 3e-2}, kl={"coef": 0.0},
            log={"checkpoint_every": 1000}, eval={"enabled": False},
        ))
        run = train(cfg, d / f"run-{adv}", echo=lambda s: None)
        r = [json.loads(x)["reward"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        first_hit = next((i + 1 for i, v in enumerate(r) if v > 0.6), None)
        out["runs"][adv] = {"first_5": sum(r[:5]) / 5, "last_5": sum(r[-5:]) / 5, "max": max(r), "first_step_above_0.6": first_hit}
        print(adv, out["runs"][adv], flush=True)
    write_result("a2c_credit", out)


if __name__ == "__main__":
    main()
