"""How well does a run's critic V(s) predict the reward, state by state?

    python benchmarks/value_probe.py --run RUN [--prompts FILE | --split eval|train]
                                     [--per-prompt 4] [--max-prompts N] [--name NAME]

Samples `--per-prompt` completions for each prompt from the run's policy — by default the
run's held-out eval prompts (`--split train` for the training ones, `--prompts FILE` for
any JSONL / CSV file of rows or a text file with one prompt a line) — scores them with the
run's reward, and reads the critic at every state of every completion (s_0 = the prompt,
…, s_n = the finished text), whatever the run's critic is (`model.critic: head | adapter |
model`). Reports on these on-policy rollouts the R² of the run's own critic against the
completion's score (the quantity a planner ranks by), and of the best linear read-out of
the features the critic reads (ridge, L2 strength by 5-fold cross-validation over prompts,
so a fold never sees its prompts' rollouts), by depth: the prompt; 1–4, 5–14, 15–29, 30+
completion tokens (unfinished); the finished text; and every state after ≥ 15 tokens.
R² ≤ 0 means the critic tells a good state from a bad one no better than the mean reward.
Also, per depth, R² and r of the critic against the return it is trained towards: the
trainer's own per-token rewards of that rollout (objectives.add_token_rewards at the run's
final β: −β·KL per token where the algorithm puts KL in the reward, fluency, the score on the
last token) summed from the state on, discounted by algorithm.gamma (the Monte-Carlo return;
the finished text's target stays its score).
Writes benchmarks/results/NAME.json (default value_probe-<run folder name>).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402

LAMBDAS = [1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]


def ridge(X: torch.Tensor, y: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    mu, ym = X.mean(0), y.mean()
    Xc = X - mu
    w = torch.linalg.solve(Xc.T @ Xc + lam * torch.eye(X.shape[1], dtype=X.dtype), Xc.T @ (y - ym))
    return w, ym - mu @ w


def r2(pred: torch.Tensor, y: torch.Tensor) -> float | None:
    var = y.var(unbiased=False)
    return float(1 - ((pred - y) ** 2).mean() / var) if len(y) > 1 and var > 0 else None


def read_prompt_rows(path: str, field: str) -> list[dict]:
    """JSONL or CSV rows (dynalm's readers), or a plain text file with one prompt a line."""
    from dynalm.data import read_rows

    if Path(path).suffix.lower() in (".jsonl", ".json", ".csv"):
        return read_rows(path, field)
    lines = [s.strip() for s in Path(path).read_text(encoding="utf-8").splitlines()]
    return [{field: s} for s in lines if s]


def select_prompts(cfg, path: str | None, split: str) -> tuple[list[dict], str]:
    """Prompt rows from --prompts, else the config's eval split (or train), and where they came from."""
    from dynalm.run import eval_rows, train_rows

    if path:
        return read_prompt_rows(path, cfg.data.prompt_field), path
    held_out = eval_rows(cfg) if split == "eval" else None
    source = split if split == "train" or held_out else "train (no eval split)"
    return held_out or train_rows(cfg), source


def depth_masks(d: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """State groups: by completion tokens read (unfinished), the finished text, and ≥ 15 tokens."""
    unfinished = d < n
    out = {"prompt": d == 0}
    for lo, hi in ((1, 5), (5, 15), (15, 30), (30, 10**6)):
        out[f"{lo}-{hi - 1}" if hi < 10**6 else f"{lo}+"] = unfinished & (d >= lo) & (d < hi)
    out["finished"] = d == n
    out["15+ (all)"] = d >= 15
    return out


@torch.no_grad()
def main() -> None:
    from dynalm.envs import make_env
    from dynalm.rl.advantages import gae
    from dynalm.rl.batch import Batch
    from dynalm.rl.objectives import add_token_rewards
    from dynalm.models.generation import decode_completions, encode_prompts, sample
    from dynalm.rewards.rm_training import pearson
    from dynalm.run import set_threads
    from dynalm.trained import load_run

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True)
    ap.add_argument("--prompts", default=None, help="JSONL/CSV rows or a text file with one prompt a line")
    ap.add_argument("--split", choices=["eval", "train"], default="eval")
    ap.add_argument("--max-prompts", type=int, default=None)
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    cfg, model = load_run(a.run)
    if model.value_head is None:
        sys.exit(f"{a.run} has no critic (train it with model.value_head: true, or with a2c/ppo)")
    set_threads(cfg)
    env = make_env(cfg, model)
    prompts, source = select_prompts(cfg, a.prompts, a.split)
    prompts = prompts[: a.max_prompts] if a.max_prompts else prompts
    rows = [(i, r) for i, r in enumerate(prompts) for _ in range(a.per_prompt)]
    gen = torch.Generator(device=model.device).manual_seed(0)
    feats, targets, groups, depths, lengths, own, rets = [], [], [], [], [], [], []
    beta = model.trained_beta if model.trained_beta is not None else cfg.kl.coef
    t0 = time.perf_counter()
    for s in range(0, len(rows), a.batch):
        chunk = rows[s : s + a.batch]
        states = [env.reset(r) for _, r in chunk]
        p_ids, p_mask, _ = encode_prompts(model.tokenizer, states, cfg.model.max_prompt_tokens, model.device)
        ids, attn, amask, logp, _, ended = sample(model, p_ids, p_mask, cfg.generation, generator=gen, with_values=False)
        comps = decode_completions(model.tokenizer, ids, amask, ended)
        _, scored, _ = env.step([r for _, r in chunk], comps, ended.tolist())
        T = amask.shape[1]
        b = Batch(ids, attn, amask, logp, None, states, comps, torch.tensor([gi for gi, _ in chunk]), ended,
                  ref_logprobs=model.reference_logprobs(ids, attn, T, cfg.generation.temperature),
                  scores=torch.tensor(scored.scores, dtype=torch.float32))
        add_token_rewards(b, beta, algorithm=cfg.algorithm, kl=cfg.kl, fluency_coef=cfg.env.fluency_coef,
                          max_new_tokens=cfg.generation.max_new_tokens)
        # G_t = r_t + γ·G_{t+1}: GAE with λ = 1 and V = 0 is the Monte-Carlo return to go
        _, to_go = gae(b.rewards.double(), torch.zeros_like(b.rewards, dtype=torch.float64), amask.double(),
                       cfg.algorithm.gamma, 1.0)
        h = model.critic_hidden(ids, attn)  # the features the critic's head reads
        v = model.state_values(ids, attn)
        P = p_ids.shape[1]
        for j, (gi, _) in enumerate(chunk):
            n = int(amask[j].sum())
            feats.append(h[j, P - 1 : P + n].double())  # states s_0 .. s_n (left-padded prompts end at P-1)
            own.append(v[j, P - 1 : P + n].double())
            targets += [scored.scores[j]] * (n + 1)
            rets += to_go[j, :n].tolist() + [scored.scores[j]]
            groups += [gi] * (n + 1)
            depths += list(range(n + 1))
            lengths += [n] * (n + 1)
        print(f"{s + len(chunk)}/{len(rows)} rollouts, {time.perf_counter() - t0:.0f} s", flush=True)
    X, y, own_v = torch.cat(feats), torch.tensor(targets, dtype=torch.float64), torch.cat(own)
    G = torch.tensor(rets, dtype=torch.float64)
    g, d, n = torch.tensor(groups), torch.tensor(depths), torch.tensor(lengths)
    folds = g % 5
    cv = {}
    for lam in LAMBDAS:
        pred = torch.empty_like(y)
        for f in range(5):
            tr = folds != f
            w, b = ridge(X[tr], y[tr], lam)
            pred[~tr] = X[~tr] @ w + b
        cv[lam] = pred
    best = max(LAMBDAS, key=lambda lam: r2(cv[lam], y) or -1e9)
    pred = cv[best]
    by_depth = [
        {"depths": k, "states": int(m.sum()), "r2_critic": r2(own_v[m], y[m]), "r2_ridge_cv": r2(pred[m], y[m]),
         "r_critic": pearson(own_v[m].tolist(), y[m].tolist()), "critic_bias": float((own_v[m] - y[m]).mean()),
         "r2_critic_return": r2(own_v[m], G[m]), "r_critic_return": pearson(own_v[m].tolist(), G[m].tolist()),
         "critic_bias_return": float((own_v[m] - G[m]).mean())}
        for k, m in depth_masks(d, n).items() if m.any()
    ]
    res = {
        "command": "python benchmarks/value_probe.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "run": a.run, "critic": model.critic_kind, "value_norm": model.value_norm is not None,
        "prompts": source, "n_prompts": len(prompts), "rollouts": len(rows), "states": int(y.numel()),
        "reward_mean": float(y.mean()), "reward_std_over_states": float(y.std()),
        "r2_critic": r2(own_v, y), "r2_ridge_cv": r2(pred, y), "ridge_lambda": best,
        "beta": beta, "gamma": cfg.algorithm.gamma, "r2_critic_return": r2(own_v, G),
        "r2_ridge_cv_by_lambda": {str(k): r2(v, y) for k, v in cv.items()}, "by_depth": by_depth,
        "seconds": time.perf_counter() - t0,
    }
    write_result(a.name or f"value_probe-{Path(a.run).name}", res)

    def f(x):
        return "n/a" if x is None else f"{x:.3f}"

    print(f"R² on {len(rows)} rollouts of {len(prompts)} {source} prompts ({res['states']} states), critic "
          f"'{model.critic_kind}': {f(res['r2_critic'])}; best ridge read-out (5-fold CV over prompts, λ={best:g}) "
          f"{f(res['r2_ridge_cv'])}")
    for row in by_depth:
        print(f"  {row['depths']:>10}: critic {f(row['r2_critic'])} (r {f(row['r_critic'])}, bias {row['critic_bias']:+.3f}), "
              f"ridge {f(row['r2_ridge_cv'])}; against the return: critic {f(row['r2_critic_return'])} "
              f"(r {f(row['r_critic_return'])}, bias {row['critic_bias_return']:+.3f})  ({row['states']} states)")


if __name__ == "__main__":
    main()
