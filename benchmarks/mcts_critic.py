"""Value-guided mcts with a critic of its own trunk: the critic's prefix cached or not.

    python benchmarks/mcts_critic.py --run RUN [--prompts 4] [--simulations 8] [--name NAME]

RUN must have `model.critic: adapter | model`. For each of the first `--prompts` held-out
prompts, one completion by sampling, then by `mcts` (leaf: value) twice, in alternation:
with `models/critic.PrefixCritic` (the critic's pass over the prompt and the committed tokens
kept as a KV cache; each leaf forwards its path alone) and without it (each leaf runs the
critic over the whole text, as before the cache). Reports median seconds per completion,
the ratios to sampling, and whether both searches emitted the same tokens.
Writes benchmarks/results/NAME.json (default mcts_critic).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


class FullPass:
    """The uncached reading: the critic over the whole text for every leaf."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def value(self, prefix: list[int], path: list[int]) -> float:
        ids = torch.tensor([prefix + path], device=self.model.device)
        return float(self.model.state_values(ids, torch.ones_like(ids))[0, -1])


def main() -> None:
    from dynalm.envs import TextEnv
    from dynalm.models import critic as critic_mod
    from dynalm.planning import path_reward_for, plan
    from dynalm.planning import mcts as mcts_mod
    from dynalm.run import eval_rows, set_threads
    from dynalm.trained import load_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--simulations", type=int, default=8)
    ap.add_argument("--name", default="mcts_critic")
    a = ap.parse_args()
    cfg, model = load_run(a.run)
    if model.critic_kind == "head":
        sys.exit(f"{a.run} reads V off the policy's trunk (model.critic: head): nothing to cache")
    set_threads(cfg)
    env = TextEnv(cfg, model.tokenizer)
    rows = eval_rows(cfg)[: a.prompts]
    pr = path_reward_for(cfg, model)
    mc = cfg.planner.model_copy(update={"name": "mcts", "simulations": a.simulations, "leaf": "value"})
    sc = cfg.planner.model_copy(update={"name": "sample"})
    secs = {"sample": [], "mcts cached": [], "mcts uncached": []}
    same = []
    for r in rows:
        t = time.perf_counter()
        plan(model, env, [r], cfg.generation, sc, max_prompt_tokens=cfg.model.max_prompt_tokens)
        secs["sample"].append(time.perf_counter() - t)
        out = {}
        for side, cls in (("mcts cached", critic_mod.PrefixCritic), ("mcts uncached", FullPass)):
            mcts_mod.PrefixCritic = cls
            t = time.perf_counter()
            out[side] = plan(model, env, [r], cfg.generation, mc, max_prompt_tokens=cfg.model.max_prompt_tokens,
                             path_reward=pr).completions[0]
            secs[side].append(time.perf_counter() - t)
        mcts_mod.PrefixCritic = critic_mod.PrefixCritic
        same.append(out["mcts cached"] == out["mcts uncached"])
        print({k: round(v[-1], 2) for k, v in secs.items()}, "same text" if same[-1] else "texts differ", flush=True)
    med = {k: statistics.median(v) for k, v in secs.items()}
    res = {"command": "python benchmarks/mcts_critic.py " + " ".join(sys.argv[1:]), "machine": machine(), "run": a.run,
           "critic": model.critic_kind, "simulations": a.simulations, "prompts": len(rows),
           "median_seconds": med, "x_sample": {k: v / med["sample"] for k, v in med.items()},
           "speedup": med["mcts uncached"] / med["mcts cached"], "same_text": same, "seconds": secs}
    p = write_result(a.name, res)
    print(f"machine: {res['machine']}; median s/completion {({k: round(v, 2) for k, v in med.items()})}; "
          f"cached {res['speedup']:.2f}x faster; same text on {sum(same)}/{len(same)}; wrote {p}")


if __name__ == "__main__":
    main()
