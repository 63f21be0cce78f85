"""How much of the reward can any critic predict from a state? The ceiling on V(s)'s R².

    python benchmarks/value_ceiling.py (--run RUN | --config CFG [--set k=v ...])
                                       [--prompts FILE | --split eval|train] [--max-prompts 24]
                                       [--depths 0,5,15,30] [--continuations 8] [--name NAME]

The best any critic can do at a state s is E[R | s]; what is left is the reward's spread
over the continuations the policy samples from s. So the largest R² a critic can reach on
states at depth d (value_probe.py's quantity, on the same kind of on-policy states) is

    R²_max(d) = 1 − E_s[Var(R | s)] / Var(R)

This script samples one rollout per prompt from the policy (a run's, or a config's
untrained model), takes the state after its first d completion tokens (for every d in
--depths at which the rollout is still unfinished; d = 0 is the prompt), samples
--continuations completions from each such state, scores them with the run's reward, and
estimates R²_max(d) from the per-state sample variances (K − 1 denominator) over the
variance of every continuation's reward, with a 90 % bootstrap interval over states. A
critic target above R²_max cannot be met by any critic, however it is trained.

Beside it, `prefix_reward_r2_loo`: the R² (same denominator) of the simplest critic that
needs no training, a line in the reward of the unfinished text itself, fitted
leave-one-state-out so that it is out of sample. A learned critic that does not beat it
has learned less than the reward already says about the prefix.
Single-turn tasks only. Writes benchmarks/results/NAME.json (default value_ceiling-<name>).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402
from value_probe import r2, ridge, select_prompts  # noqa: E402


def ceiling(R: torch.Tensor) -> float | None:
    """1 − mean within-state variance / total variance, for R of shape [states, continuations]."""
    total = R.flatten().var(unbiased=False)
    if R.shape[0] < 2 or R.shape[1] < 2 or total <= 0:
        return None
    return float(1 - R.var(dim=1, unbiased=True).mean() / total)


def bootstrap(R: torch.Tensor, reps: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """5th and 95th percentiles of `ceiling` over states resampled with replacement."""
    g = torch.Generator().manual_seed(seed)
    vals = [ceiling(R[torch.randint(0, R.shape[0], (R.shape[0],), generator=g)]) for _ in range(reps)]
    vals = torch.tensor([v for v in vals if v is not None], dtype=torch.float64)
    if not len(vals):
        return None
    return float(vals.quantile(0.05)), float(vals.quantile(0.95))


def affine_loo_r2(x: torch.Tensor, R: torch.Tensor) -> float | None:
    """Out-of-sample R² of R[j, k] predicted by a + b·x[j], the line fitted without state j.

    Same denominator as `ceiling` (the variance of every continuation's reward), so the two
    compare directly: how much of the ceiling a critic-free predictor of the state reaches."""
    n, K = R.shape
    if n < 3:
        return None
    xs, ys = x.repeat_interleave(K)[:, None], R.flatten()
    pred = torch.empty_like(ys)
    for j in range(n):
        held = torch.zeros(n * K, dtype=torch.bool)
        held[j * K : (j + 1) * K] = True
        # a vanishing ridge keeps the fit solvable when x is constant (slope 0, the mean)
        w, b = ridge(xs[~held], ys[~held], 1e-12)
        pred[held] = xs[held] @ w + b
    return r2(pred, ys)


def load(a):
    from dynalm.config import load_config
    from dynalm.models.policy import PolicyValueModel
    from dynalm.trained import load_run

    if a.run:
        return load_run(a.run)
    cfg = load_config(a.config, a.set)
    return cfg, PolicyValueModel.from_config(cfg).eval()


@torch.no_grad()
def main() -> None:
    from dynalm.envs import make_env
    from dynalm.models.generation import encode_prompts, left_pad, sample
    from dynalm.run import set_threads

    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run")
    src.add_argument("--config")
    ap.add_argument("--set", action="append", default=[], help="config override for --config, as dynalm train --set")
    ap.add_argument("--prompts", default=None, help="JSONL/CSV rows or a text file with one prompt a line")
    ap.add_argument("--split", choices=["eval", "train"], default="eval")
    ap.add_argument("--max-prompts", type=int, default=24)
    ap.add_argument("--depths", default="0,5,15,30")
    ap.add_argument("--continuations", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    if a.continuations < 2:
        sys.exit("--continuations must be at least 2 (the within-state variance needs two samples)")
    depths = sorted({int(x) for x in a.depths.split(",")})
    cfg, model = load(a)
    set_threads(cfg)
    env = make_env(cfg, model)
    prompts, source = select_prompts(cfg, a.prompts, a.split)
    prompts = prompts[: a.max_prompts]
    tok, T = model.tokenizer, cfg.generation.max_new_tokens
    gen = torch.Generator(device=model.device).manual_seed(a.seed)
    t0 = time.perf_counter()

    def rollouts(prefixes: list[list[int]], new: int):
        """Sample `new` tokens after each token prefix; (completion tokens without EOS, ended) per row."""
        out = []
        g = cfg.generation.model_copy(update={"max_new_tokens": new})
        for s in range(0, len(prefixes), a.batch):
            ids, mask = left_pad(prefixes[s : s + a.batch], tok.pad_token_id, model.device)
            seq, _, amask, _, _, ended = sample(model, ids, mask, g, generator=gen, with_values=False)
            for row, m, e in zip(seq[:, -new:].tolist(), amask.tolist(), ended.tolist()):
                n = int(sum(m))
                out.append((row[: n - 1] if e and n else row[:n], bool(e)))
        return out

    def score(rows: list[dict], comps: list[list[int]], ended: list[bool]) -> list[float]:
        texts = [tok.decode(c, skip_special_tokens=True).strip() for c in comps]
        return list(env.step(rows, texts, ended)[1].scores)

    # one on-policy trunk rollout per prompt: its states at each depth are the ones probed
    states = [env.reset(r) for r in prompts]
    p_ids, p_mask, _ = encode_prompts(tok, states, cfg.model.max_prompt_tokens, model.device)
    heads = [row[m.bool()].tolist() for row, m in zip(p_ids, p_mask)]
    trunk = rollouts(heads, T)
    by_depth = []
    for d in depths:
        # the rollout is still unfinished after d tokens (EOS not yet sampled, room left)
        live = [i for i, (c, _) in enumerate(trunk) if d < T and (d == 0 or len(c) > d)]
        if len(live) < 2:
            by_depth.append({"depth": d, "states": len(live), "r2_max": None})
            continue
        K = a.continuations
        pre = [trunk[i][0][:d] for i in live]
        cont = rollouts([heads[i] + p for i, p in zip(live, pre) for _ in range(K)], T - d)
        full = [pre[j // K] + c for j, (c, _) in enumerate(cont)]
        R = torch.tensor(score([prompts[live[j // K]] for j in range(len(cont))], full, [e for _, e in cont]),
                         dtype=torch.float64).view(len(live), K)
        lo_hi = bootstrap(R)
        # the critic-free baseline: the reward of the unfinished text itself, scored as if it ended here
        r_pre = torch.tensor(score([prompts[i] for i in live], pre, [False] * len(live)), dtype=torch.float64)
        row = {"depth": d, "states": len(live), "continuations": K, "r2_max": ceiling(R),
               "r2_max_90ci": lo_hi, "prefix_reward_r2_loo": affine_loo_r2(r_pre, R),
               "reward_mean": float(R.mean()), "reward_std": float(R.flatten().std()),
               "within_state_std_mean": float(R.var(dim=1, unbiased=True).mean().sqrt())}
        by_depth.append(row)
        ci = f"[{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "n/a"
        r2m = "n/a" if row["r2_max"] is None else f"{row['r2_max']:.3f}"
        pr = row["prefix_reward_r2_loo"]
        print(f"depth {d:>3}: R²_max {r2m} (90% {ci}), r(prefix) {'n/a' if pr is None else f'{pr:.3f}'}, "
              f"over {len(live)} states × {K}, "
              f"reward std {row['reward_std']:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
    res = {
        "command": "python benchmarks/value_ceiling.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "run": a.run, "config": a.config, "set": a.set, "prompts": source,
        "n_prompts": len(prompts), "by_depth": by_depth, "seconds": time.perf_counter() - t0,
    }
    write_result(a.name or f"value_ceiling-{Path(a.run or a.config).stem}", res)


if __name__ == "__main__":
    main()
