"""What keeping the KV cache across turns saves in a multi-turn rollout (generation.turn_cache
for the policy, env.user_generation.turn_cache for the simulated user).

    python benchmarks/turn_cache.py [--episodes 8] [--reps 3] [--turns 3] [--name turn_cache]

The dialog preset (configs/dialog.yaml: the embedded SmolLM2-135M-Instruct with LoRA, a
value head, the policy's reference as the simulated user), one rollout of `--episodes`
held-out episodes at a time, with both caches on and both off, interleaved under the same
seed. Reports per side the median rollout wall time, the environment's share of it (the
simulated user's replies and the rewards), the user simulator's own time, the rest (the
policy's prefills and decoding), the prompt columns the policy's and the simulator's
prefills read per rollout, and whether both sides produced the same episodes token for token (the cache
changes no maths: any difference is float rounding flipping a sample). Writes
benchmarks/results/NAME.json.
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

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--name", default="turn_cache")
    a = ap.parse_args()

    from dynalm.config import load_config
    from dynalm.envs import make_env
    from dynalm.models.policy import PolicyValueModel
    from dynalm.rl import episodes
    from dynalm.rl.trainer import seed_everything
    from dynalm.run import eval_rows, set_threads

    base = load_config(ROOT / "configs" / "dialog.yaml", {"env": {"turns": a.turns}, "train": {"threads": 2}})
    set_threads(base)
    seed_everything(0)
    model = PolicyValueModel.from_config(base)
    rows = (eval_rows(base) or [])[: a.episodes]
    from dynalm.envs import dialog

    read, user_read = [], []  # prompt columns the current rollout's policy / simulator prefills read

    def counting(real, into):
        def spy(m, new_ids, *args, **kw):
            into.append(new_ids.shape[1] * new_ids.shape[0])
            return real(m, new_ids, *args, **kw)
        return spy

    episodes.sample_turn = counting(episodes.sample_turn, read)
    dialog.sample_turn = counting(dialog.sample_turn, user_read)
    dialog.sample = counting(dialog.sample, user_read)
    from dynalm.rewards import RewardSet

    rewards = RewardSet(base.rewards)  # one set, so the sentence encoder loads once, in the warm-up
    episodes.rollout(model, make_env(base, model, rewards), rows[:2], [0, 1], base.generation,
                     max_prompt_tokens=base.model.max_prompt_tokens, generator=torch.Generator().manual_seed(99), training=True)
    sides = {True: [], False: []}
    same, max_dlogp = [], []
    for rep in range(a.reps):
        out = {}
        for on in (True, False):
            ug = base.env.user_generation.model_copy(update={"turn_cache": on})
            cfg = base.model_copy(update={"generation": base.generation.model_copy(update={"turn_cache": on}),
                                          "env": base.env.model_copy(update={"user_generation": ug})})
            env = make_env(cfg, model, rewards)
            read.clear()
            user_read.clear()
            t0 = time.perf_counter()
            batch, _, info = episodes.rollout(
                model, env, rows, list(range(len(rows))), cfg.generation, max_prompt_tokens=cfg.model.max_prompt_tokens,
                generator=torch.Generator().manual_seed(rep), training=True,
            )
            wall = time.perf_counter() - t0
            sides[on].append({"wall": wall, "env": info["time/env"], "user": info["time/user"],
                              "policy": wall - info["time/env"], "prefill_tokens": sum(read),
                              "user_prefill_tokens": sum(user_read), "assistant_tokens": int(batch.action_mask.sum())})
            out[on] = batch
            print(f"rep {rep} turn_cache={on}: {wall:.2f} s (env {info['time/env']:.2f} s, user {info['time/user']:.2f} s), "
                  f"prefills read {sum(read)} policy / {sum(user_read)} user columns", flush=True)
        b1, b0 = out[True], out[False]
        eq = b1.input_ids.shape == b0.input_ids.shape and bool(torch.equal(b1.input_ids, b0.input_ids))
        same.append(eq)
        if eq:
            max_dlogp.append(float((b1.logprobs - b0.logprobs).abs().max()))

    def med(on, key):
        return statistics.median(r[key] for r in sides[on])

    res = {
        "machine": machine(),
        "command": f"python benchmarks/turn_cache.py --episodes {a.episodes} --reps {a.reps} --turns {a.turns}",
        "episodes": len(rows), "turns": a.turns, "reps": a.reps,
        "sides": {("on" if on else "off"): {k: med(on, k) for k in ("wall", "env", "user", "policy", "prefill_tokens", "user_prefill_tokens")}
                  for on in (True, False)},
        "runs": {("on" if on else "off"): sides[on] for on in (True, False)},
        "identical_episodes": same, "max_abs_logprob_diff": max(max_dlogp) if max_dlogp else None,
    }
    on, off = res["sides"]["on"], res["sides"]["off"]
    res["ratio_policy_time"] = on["policy"] / off["policy"]
    res["ratio_wall"] = on["wall"] / off["wall"]
    res["ratio_user_time"] = on["user"] / off["user"]
    print(f"policy time on/off: {on['policy']:.2f}/{off['policy']:.2f} s = {res['ratio_policy_time']:.2f}; "
          f"wall {on['wall']:.2f}/{off['wall']:.2f} s = {res['ratio_wall']:.2f}; prefill columns "
          f"{on['prefill_tokens']:.0f}/{off['prefill_tokens']:.0f}; user time {on['user']:.2f}/{off['user']:.2f} s = "
          f"{res['ratio_user_time']:.2f}, user prefill columns {on['user_prefill_tokens']:.0f}/{off['user_prefill_tokens']:.0f}; identical episodes {sum(same)}/{len(same)}")
    print(write_result(a.name, res))


if __name__ == "__main__":
    main()
