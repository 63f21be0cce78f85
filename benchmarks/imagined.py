"""What capping imagined observations at the longest real one does: speed and drift.

    python benchmarks/imagined.py --run runs/dyna_env-guess-s2-plain-2 --em runs/dyna_env-guess-s2-dyna-2/env_model
                                  [--prompts 32] [--lookahead] [--name imagined-guess]

The run's trained policy plays its held-out episodes entirely inside the environment model
(`env.kind: model`), once with the model's observations allowed `max_observation_tokens`
and once capped at the longest real observation (`cap_to_longest_seen`, the default since
the cap came in). The longest real observation is the model folder's own record or, for a
folder from before the cap, the longest of those real replies.
Reported per variant: seconds per episode, imagined observations, their mean length in
tokens, and the share that are word for word one of the real environment's replies (in the
same episodes played in the real environment, evaluated first): a reply that runs on past
its end of turn is not. With `--lookahead`,
also lookahead (n 4, depth 2) in the real environment with each model. Writes
benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402
from lookahead import evaluate  # noqa: E402


def observations(ev: dict) -> list[str]:
    """The environment's replies (user turns after the opening) in an eval's episodes."""
    return [t["content"] for s in ev["samples"] for t in s["turns"][1:] if t["role"] == "user"]


def observation_stats(ev: dict, real: set[str], tokenizer) -> dict:
    obs = observations(ev)
    toks = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in obs]
    return {"observations": len(obs), "mean_tokens": sum(toks) / max(len(toks), 1),
            "share_real_replies": sum(o in real for o in obs) / max(len(obs), 1), "examples": obs[:6]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="a trained run of a multi-turn environment (its transcripts give the real replies)")
    ap.add_argument("--em", required=True, help="an environment model folder")
    ap.add_argument("--prompts", type=int, default=32, help="held-out episodes")
    ap.add_argument("--lookahead", action="store_true", help="also lookahead n=4 depth=2 in the real environment with each model")
    ap.add_argument("--name", default=None, help="result file (default: imagined-<run name>)")
    a = ap.parse_args()
    from dynalm.envmodel.train import load_env_model, save_env_model

    run = Path(a.run)
    model, meta = load_env_model(a.em, "cpu", fresh=True)
    sets = [f"eval.max_prompts={a.prompts}"]
    real_ev, _ = evaluate(run, "sample", sets, run / "bench-imagined-real.json")
    real = set(observations(real_ev))
    longest = meta.get("longest_observation") or max(len(model.target_ids([{"role": "user", "content": c}])) for c in real)
    rows = []
    for variant, cap in (("uncapped", False), ("capped", True)):
        model.cfg.cap_to_longest_seen, model.longest_observation = cap, longest
        em = save_env_model(model, run / f"bench-imagined-{variant}-em", meta["metrics"], meta["openings"])
        ev, wall = evaluate(run, "sample", sets + ["env.kind=model", f"env.path={em}", "rewards=[]"], run / f"bench-imagined-{variant}.json")
        row = {"variant": variant, "budget_tokens": model.observation_budget(), "imagined_return": ev["reward"],
               "seconds_per_episode": ev["seconds_per_sample"], "wall_seconds": round(wall, 1),
               **observation_stats(ev, real, model.tokenizer)}
        if a.lookahead:
            la, la_wall = evaluate(run, "lookahead", sets + ["planner.n=4", "planner.depth=2", f"planner.env_model={em}"],
                                   run / f"bench-imagined-lookahead-{variant}.json")
            row["lookahead"] = {"return": la["reward"], "success_rate": la.get("success_rate"),
                                "seconds_per_episode": la["seconds_per_sample"], "real_env_steps": la.get("env_steps"),
                                "imagined_steps": la.get("imagined_steps"), "wall_seconds": round(la_wall, 1)}
        rows.append(row)
        print({k: v for k, v in row.items() if k != "examples"}, flush=True)
    p = write_result(a.name or f"imagined-{run.name}", {
        "command": "python benchmarks/imagined.py " + " ".join(sys.argv[1:]), "machine": machine(), "run": str(run),
        "env_model": a.em, "longest_observation": longest, "real_return": real_ev["reward"], "real_replies": sorted(real), "rows": rows})
    print(f"machine: {machine()}; {a.prompts} held-out episodes of {run} inside {a.em}")
    print("| observations | budget (tokens) | s / episode | mean tokens | real replies word for word | imagined return |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['budget_tokens']} | {r['seconds_per_episode']:.2f} | {r['mean_tokens']:.1f} | "
              f"{100 * r['share_real_replies']:.0f} % | {r['imagined_return']:.3f} |")
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
