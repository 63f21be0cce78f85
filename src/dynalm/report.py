"""The run report: reward/KL curves as a PNG, and one list of blocks (warnings, eval table,
samples, planner table, per-token view) rendered twice: `report.md` and `report.html`, a
self-contained page (images inline, the per-token view embedded) that opens in a browser."""

from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

from .evaluate import summary_rows


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


PLANNER_COLUMNS = ["planner", "reward", "KL", "distinct-2", "s / sample", "forward calls"]


def planner_rows(run_dir: Path, eval_result: dict | None) -> tuple[list[str], list[list]] | None:
    """One row per decoder evaluated on this run (`dynalm eval --run R --planner P`); None below two."""
    rows = []
    if eval_result and "trained" in eval_result:
        rows.append(eval_result["trained"])
    for p in sorted(run_dir.glob("eval-*.json")):
        side = json.loads(p.read_text()).get("trained")  # an eval of another model (e.g. `--model`, "model" side) has none
        if side is not None:
            rows.append(side)
    if len(rows) < 2:
        return None
    return PLANNER_COLUMNS, [
        [r.get("planner", "sample"), r["reward"], r.get("kl"), r.get("distinct2"), r.get("seconds_per_sample"),
         r.get("forward_calls", r.get("env_steps", ""))]
        for r in rows
    ]


def _num(x, digits: int) -> str:
    """A table cell: the number, or – where a planner does not measure it (a planned episode has no KL)."""
    return "–" if x is None else f"{x:.{digits}f}"


def hacking_flags(eval_result: dict | None) -> list[str]:
    from .metrics import reward_hacking_flags

    if not eval_result or "base" not in eval_result or "trained" not in eval_result:
        return []
    return reward_hacking_flags(eval_result["base"], eval_result["trained"])


def report_blocks(run_dir: Path, eval_result: dict | None, n_samples: int = 4) -> list[tuple]:
    """What the report says, in order, as (kind, ...) blocks that both renderers read."""
    metrics = read_metrics(run_dir)
    out: list[tuple] = [("title", run_dir.name)]
    out += [("warning", flag) for flag in hacking_flags(eval_result)]
    if metrics:
        first, last = metrics[0], metrics[-1]
        out.append(("para", f"Steps: {last['step']}. Training reward: {first['reward']:.4f} at step 1 → {last['reward']:.4f} "
                            f"at the last step; KL to the reference at the end: {last['kl']:.3f} nats per completion."))
    if plot_curves(metrics, run_dir / "curves.png"):
        out.append(("image", "curves.png", "reward and KL curves"))
    if eval_result:
        cols, rows = summary_rows(eval_result)
        cells = [[k, *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in vals)] for k, *vals in rows]
        out += [("heading", "Eval (held-out prompts)"), ("table", cols, cells)]
        if "delta_reward" in eval_result:
            out.append(("para", f"Eval reward, trained − base: **{eval_result['delta_reward']:+.4f}**."))
        sides = [s for s in ("base", "trained") if s in eval_result]
        samples = []
        for i in range(min(n_samples, len(eval_result[sides[0]]["samples"]))):
            per_side = [(s, eval_result[s]["samples"][i]) for s in sides]
            samples.append((per_side[0][1]["prompt"], [(s, smp["reward"], smp["completion"]) for s, smp in per_side]))
        out += [("heading", "Samples"), ("samples", samples)]
    if (run_dir / "tokens.html").is_file():
        out.append(("tokens", "tokens.html"))
    planners = planner_rows(run_dir, eval_result)
    if planners:
        cols, rows = planners
        digits = (None, 4, 3, 3, 2, None)
        cells = [[str(v) if d is None else _num(v, d) for v, d in zip(r, digits)] for r in rows]
        out += [("heading", "Decoding with the model (planners)"), ("table", cols, cells)]
    return out


def _md_cell(s: str) -> str:
    return s.replace("\n", " ").replace("|", "\\|")


def render_markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for kind, *a in blocks:
        if kind == "title":
            lines += [f"# dynalm run report: `{a[0]}`", ""]
        elif kind == "warning":
            lines += [f"> **Warning — possible reward hacking:** {a[0]}", ""]
        elif kind == "para":
            lines += [a[0], ""]
        elif kind == "image":
            lines += [f"![{a[1]}]({a[0]})", ""]
        elif kind == "heading":
            lines += [f"## {a[0]}", ""]
        elif kind == "table":
            cols, rows = a
            lines += ["| " + " | ".join(cols) + " |", "|---|" + "---|" * (len(cols) - 1)]
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            lines += [""]
        elif kind == "samples":
            for prompt, sides in a[0]:
                lines += [f"**Prompt:** {_md_cell(prompt)}", ""]
                lines += [f"- *{s}* (reward {r:.3f}): {_md_cell(c)}" for s, r, c in sides]
                lines += [""]
        elif kind == "tokens":
            lines += [f"Per-token advantages, KL and rewards for a few eval samples: [{a[0]}]({a[0]})", ""]
    return "\n".join(lines)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.2em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    "th{background:#f3f3f3}td:not(:first-child){font-variant-numeric:tabular-nums}"
    ".warning{background:#fff3cd;border-left:4px solid #e0a800;padding:.6em 1em;margin:.6em 0}"
    ".sample{margin:.8em 0 1.2em}.side{margin:.2em 0 .2em 1.2em}.side i{color:#555}"
    "img{max-width:100%}iframe{width:100%;height:38em;border:1px solid #ccc}"
)


def _inline(text: str) -> str:
    """Escape, then the one piece of markdown the blocks use: **bold**."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))


def render_html(blocks: list[tuple], run_dir: Path) -> str:
    """One file that needs nothing beside it: the PNGs inline, the per-token view in an iframe's srcdoc."""
    title = "dynalm run report: " + next((a[0] for k, *a in blocks if k == "title"), "")
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body>"]
    for kind, *a in blocks:
        if kind == "title":
            parts.append(f"<h1>dynalm run report: <code>{html.escape(a[0])}</code></h1>")
        elif kind == "warning":
            parts.append(f"<div class='warning' role='alert'><b>Warning — possible reward hacking:</b> {html.escape(a[0])}</div>")
        elif kind == "para":
            parts.append(f"<p>{_inline(a[0])}</p>")
        elif kind == "image":
            data = base64.b64encode((run_dir / a[0]).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(a[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "heading":
            parts.append(f"<h2>{html.escape(a[0])}</h2>")
        elif kind == "table":
            cols, rows = a
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "samples":
            for prompt, sides in a[0]:
                rows = "".join(f"<div class='side'><i>{html.escape(s)}</i> (reward {r:.3f}): {html.escape(c)}</div>"
                               for s, r, c in sides)
                parts.append(f"<div class='sample'><b>Prompt:</b> {html.escape(prompt)}{rows}</div>")
        elif kind == "tokens":
            page = (run_dir / a[0]).read_text(encoding="utf-8")
            parts.append("<h2>Per-token view</h2><p>Advantages, KL and rewards per token for a few eval samples "
                         f"(also <a href='{a[0]}'>{a[0]}</a>).</p>"
                         f"<iframe title='per-token view' srcdoc=\"{html.escape(page, quote=True)}\"></iframe>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(run_dir: Path, eval_result: dict | None, n_samples: int = 4) -> Path:
    """report.md and report.html from the same blocks; returns report.md's path."""
    blocks = report_blocks(run_dir, eval_result, n_samples)
    out = run_dir / "report.md"
    out.write_text(render_markdown(blocks), encoding="utf-8")
    (run_dir / "report.html").write_text(render_html(blocks, run_dir), encoding="utf-8")
    return out


def finalize_report(run_dir: Path, eval_result: dict | None, model=None, cfg=None, rows=None, echo=print, n_tokens: int = 4) -> Path:
    """report.md and report.html, the per-token HTML view (when a model and eval rows are
    given), and any reward-hacking warnings, which are also printed."""
    if model is not None and cfg is not None and rows:
        from .interpret import token_table, write_token_html

        write_token_html(token_table(model, rows[:n_tokens], cfg, seed=cfg.eval.seed), run_dir / "tokens.html")
    for flag in hacking_flags(eval_result):
        echo(f"warning: possible reward hacking: {flag}")
    return write_report(run_dir, eval_result)
