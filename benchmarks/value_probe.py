"""How well can a value head on the last hidden layer predict the story reward?

    python benchmarks/value_probe.py [--run runs/demo] [--per-prompt 4]

Samples `--per-prompt` completions for every training opening from the run's policy, scores
them with the run's reward, and reads the last hidden layer at every state of every
completion (s_0 = the prompt, ..., s_T = the finished text): the states the value head
V(s) = w·h + b sees. Reports, on these on-policy rollouts, the R² of the run's own value
head and of the best linear head one could fit (ridge, the L2 strength picked by 5-fold
cross-validation over openings, so a fold never sees its openings' rollouts), overall and
by depth. R² near 0 means a linear head on these features cannot tell a good prefix from
a bad one better than the mean reward does — the reason configs/story.yaml scores mcts
leaves by rollouts. Writes benchmarks/results/value_probe.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402

DEPTHS = [(0, 1), (1, 5), (5, 15), (15, 30), (30, 10**6)]
LAMBDAS = [1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]


def ridge(X: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    mu, ym = X.mean(0), y.mean()
    Xc = X - mu
    w = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ (y - ym))
    return w, ym - mu @ w


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - ((pred - y) ** 2).mean() / y.var(unbiased=False))


@torch.no_grad()
def main() -> None:
    from dynalm.envs import make_env
    from dynalm.models.policy import position_ids_from_mask
    from dynalm.models.generation import decode_completions, encode_prompts, sample
    from dynalm.run import load_run, set_threads, train_rows

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    cfg, model = load_run(a.run)
    if model.value_head is None:
        sys.exit(f"{a.run} has no value head")
    set_threads(cfg)
    env = make_env(cfg, model)
    prompts = train_rows(cfg)
    rows = [(i, r) for i, r in enumerate(prompts) for _ in range(a.per_prompt)]
    gen = torch.Generator(device=model.device).manual_seed(0)
    feats, targets, groups, depths, own = [], [], [], [], []
    t0 = time.perf_counter()
    for s in range(0, len(rows), a.batch):
        chunk = rows[s : s + a.batch]
        states = [env.reset(r) for _, r in chunk]
        p_ids, p_mask, _ = encode_prompts(model.tokenizer, states, cfg.model.max_prompt_tokens, model.device)
        ids, attn, amask, _, _, ended = sample(model, p_ids, p_mask, cfg.generation, generator=gen, with_values=False)
        comps = decode_completions(model.tokenizer, ids, amask, ended)
        _, scored, _ = env.step([r for _, r in chunk], comps, ended.tolist())
        out = model.lm(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn),
                       output_hidden_states=True, use_cache=False, logits_to_keep=1)
        h, P = out.hidden_states[-1].float(), p_ids.shape[1]
        for j, (gi, _) in enumerate(chunk):
            n = int(amask[j].sum())
            hs = h[j, P - 1 : P + n]  # states s_0 .. s_n (left-padded prompts end at P-1)
            feats.append(hs.double())
            own.append(model.value_head(hs).squeeze(-1).double())
            targets += [scored.scores[j]] * (n + 1)
            groups += [gi] * (n + 1)
            depths += list(range(n + 1))
        print(f"{s + len(chunk)}/{len(rows)} rollouts, {time.perf_counter() - t0:.0f} s", flush=True)
    X, y, own_v = torch.cat(feats), torch.tensor(targets, dtype=torch.float64), torch.cat(own)
    g, d = torch.tensor(groups), torch.tensor(depths)
    folds = g % 5
    cv = {}
    for lam in LAMBDAS:
        pred = torch.empty_like(y)
        for f in range(5):
            tr = folds != f
            w, b = ridge(X[tr], y[tr], lam)
            pred[~tr] = X[~tr] @ w + b
        cv[lam] = pred
    best = max(LAMBDAS, key=lambda lam: r2(cv[lam], y))
    pred = cv[best]
    by_depth = []
    for lo, hi in DEPTHS:
        m = (d >= lo) & (d < hi)
        by_depth.append({"depths": f"{lo}..{min(hi, int(d.max()) + 1) - 1}", "states": int(m.sum()),
                         "r2_run_head": r2(own_v[m], y[m]), "r2_ridge_cv": r2(pred[m], y[m])})
    res = {
        "command": "python benchmarks/value_probe.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "run": a.run, "rollouts": len(rows), "states": int(y.numel()),
        "reward_mean": float(y.mean()), "reward_std_over_states": float(y.std()),
        "r2_run_head": r2(own_v, y), "r2_ridge_cv": r2(pred, y), "ridge_lambda": best,
        "r2_ridge_cv_by_lambda": {str(k): r2(v, y) for k, v in cv.items()}, "by_depth": by_depth,
        "seconds": time.perf_counter() - t0,
    }
    write_result("value_probe", res)
    print(f"R² on {len(rows)} on-policy rollouts ({res['states']} states): run's value head {res['r2_run_head']:.3f}, "
          f"best ridge head (5-fold CV over openings, λ={best:g}) {res['r2_ridge_cv']:.3f}")
    for row in by_depth:
        print(f"  depth {row['depths']}: run's head {row['r2_run_head']:.3f}, ridge {row['r2_ridge_cv']:.3f}")


if __name__ == "__main__":
    main()
