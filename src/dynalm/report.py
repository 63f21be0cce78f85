"""The run report: reward/KL curves as a PNG and `report.md` with eval and samples."""

from __future__ import annotations

import json
from pathlib import Path

from .evaluate import summary_table


def read_metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_curves(metrics: list[dict], out_png: Path) -> bool:
    if not metrics:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [m["reward"] for m in metrics], label="reward (mean)")
    # a running mean makes the trend readable through the per-batch noise
    w = max(1, len(metrics) // 10)
    sm = [sum(m["reward"] for m in metrics[max(0, i - w + 1) : i + 1]) / len(metrics[max(0, i - w + 1) : i + 1]) for i in range(len(metrics))]
    axes[0].plot(steps, sm, label=f"running mean ({w})", linewidth=2)
    axes[0].set_xlabel("step")
    axes[0].set_title("reward")
    axes[0].legend()
    axes[1].plot(steps, [m["kl"] for m in metrics], color="tab:red")
    axes[1].set_xlabel("step")
    axes[1].set_title("KL to reference (nats / sequence)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return True


def _quote(s: str) -> str:
    return s.replace("\n", " ").replace("|", "\\|")


def _planner_section(run_dir: Path, eval_result: dict | None) -> list[str]:
    """One row per decoder evaluated on this run (`dynalm eval --run R --planner P`)."""
    rows = []
    if eval_result and "trained" in eval_result:
        rows.append(eval_result["trained"])
    for p in sorted(run_dir.glob("eval-*.json")):
        rows.append(json.loads(p.read_text())["trained"])
    if len(rows) < 2:
        return []
    out = ["## Decoding with the model (planners)", "",
           "| planner | reward | KL | distinct-2 | s / sample | forward calls |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r.get('planner', 'sample')} | {r['reward']:.4f} | {_num(r.get('kl'), 3)} | {_num(r.get('distinct2'), 3)} | "
            f"{_num(r.get('seconds_per_sample'), 2)} | {r.get('forward_calls', r.get('env_steps', ''))} |"
        )
    return out + [""]


def _num(x, digits: int) -> str:
    """A table cell: the number, or – where a planner does not measure it (a planned episode has no KL)."""
    return "–" if x is None else f"{x:.{digits}f}"


def hacking_flags(eval_result: dict | None) -> list[str]:
    from .metrics import reward_hacking_flags

    if not eval_result or "base" not in eval_result or "trained" not in eval_result:
        return []
    return reward_hacking_flags(eval_result["base"], eval_result["trained"])


def write_report(run_dir: Path, eval_result: dict | None, n_samples: int = 4) -> Path:
    metrics = read_metrics(run_dir)
    lines = [f"# dynalm run report: `{run_dir.name}`", ""]
    for flag in hacking_flags(eval_result):
        lines += [f"> **Warning — possible reward hacking:** {flag}", ""]
    if metrics:
        last = metrics[-1]
        first = metrics[0]
        lines += [
            f"Steps: {last['step']}. Training reward: {first['reward']:.4f} at step 1 → {last['reward']:.4f} at the last step; "
            f"KL to the reference at the end: {last['kl']:.3f} nats per completion.",
            "",
        ]
    if plot_curves(metrics, run_dir / "curves.png"):
        lines += ["![reward and KL curves](curves.png)", ""]
    if eval_result:
        lines += ["## Eval (held-out prompts)", "", summary_table(eval_result), ""]
        if "delta_reward" in eval_result:
            lines += [f"Eval reward, trained − base: **{eval_result['delta_reward']:+.4f}**.", ""]
        sides = [s for s in ("base", "trained") if s in eval_result]
        lines += ["## Samples", ""]
        for i in range(min(n_samples, len(eval_result[sides[0]]["samples"]))):
            s0 = eval_result[sides[0]]["samples"][i]
            lines += [f"**Prompt:** {_quote(s0['prompt'])}", ""]
            for s in sides:
                smp = eval_result[s]["samples"][i]
                lines += [f"- *{s}* (reward {smp['reward']:.3f}): {_quote(smp['completion'])}"]
            lines += [""]
    if (run_dir / "tokens.html").is_file():
        lines += ["Per-token advantages, KL and rewards for a few eval samples: [tokens.html](tokens.html)", ""]
    lines += _planner_section(run_dir, eval_result)
    out = run_dir / "report.md"
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


def finalize_report(run_dir: Path, eval_result: dict | None, model=None, cfg=None, rows=None, echo=print, n_tokens: int = 4) -> Path:
    """report.md, the per-token HTML view (when a model and eval rows are given), and any
    reward-hacking warnings, which are also printed."""
    if model is not None and cfg is not None and rows:
        from .interpret import token_table, write_token_html

        write_token_html(token_table(model, rows[:n_tokens], cfg, seed=cfg.eval.seed), run_dir / "tokens.html")
    for flag in hacking_flags(eval_result):
        echo(f"warning: possible reward hacking: {flag}")
    return write_report(run_dir, eval_result)
