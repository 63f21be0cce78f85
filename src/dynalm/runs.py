"""`dynalm runs`: the runs in some folders side by side, and their reward curves on one plot.

Reads only what a run directory already holds: config.yaml (task, algorithm), metrics.jsonl
(steps, KL, periodic eval, wall time = the sum of step times), eval.json (base and final
trained reward) and the newest checkpoint's manifest (dynalm version, the git commit the
run was trained from when it ran inside a git checkout).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

from .errors import UserError
from .integrity import read_manifest, DamagedFile


def is_run(path: Path) -> bool:
    return path.is_dir() and (path / "config.yaml").is_file() and (path / "metrics.jsonl").exists()


def _metrics(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_bytes().split(b"\n"):
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a blank or half-written last line
        if isinstance(rec, dict):
            out.append(rec)
    return out


def summary(run: Path) -> dict:
    """One row of the table for the run in `run`."""
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        cfg = {}
    ms = _metrics(run)
    ev = None
    if (run / "eval.json").is_file():
        try:
            ev = json.loads((run / "eval.json").read_text(encoding="utf-8"))
        except ValueError:
            ev = None
    periodic = [m["eval/reward"] for m in ms if isinstance(m.get("eval/reward"), (int, float))]
    final = ev["trained"]["reward"] if ev and "trained" in ev else None
    commit = version = None
    ckpts = sorted((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
    if ckpts:
        try:
            man = read_manifest(ckpts[-1]) or {}
        except DamagedFile:
            man = {}
        commit, version = man.get("commit"), man.get("dynalm_version")
    return {
        "run": str(run),
        "task": cfg.get("task"),
        "algorithm": (cfg.get("algorithm") or {}).get("name"),
        "steps": ms[-1]["step"] if ms else 0,
        "of_steps": (cfg.get("train") or {}).get("steps"),
        "base_reward": ev["base"]["reward"] if ev and "base" in ev else None,
        "final_reward": final,
        "best_reward": max(periodic + ([final] if final is not None else [])) if (periodic or final is not None) else None,
        "kl": ms[-1].get("kl") if ms else None,
        "wall_seconds": sum(m.get("time/step", 0.0) for m in ms),
        "commit": commit,
        "dynalm_version": version,
        "curve": [(m["step"], m["reward"]) for m in ms if "reward" in m],
    }


def find_runs(paths: list[str]) -> list[Path]:
    """Runs among `paths` (a folder of runs counts for each run in it); one line when none."""
    found = []
    for p in map(Path, paths):
        if is_run(p):
            found.append(p)
        elif p.is_dir():
            found += sorted(q for q in p.iterdir() if is_run(q))
    if not found:
        raise UserError(f"no run directories in {' '.join(paths)}", "pass folders made by `dynalm train` (or the folder holding them)")
    return found


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


COLUMNS = ["run", "task", "algorithm", "steps", "base → final eval", "best eval", "KL", "wall", "commit"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        steps = f"{r['steps']}/{r['of_steps']}" if r["of_steps"] is not None else str(r["steps"])
        out.append([r["run"], _fmt(r["task"]), _fmt(r["algorithm"]), steps,
                    f"{_fmt(r['base_reward'])} → {_fmt(r['final_reward'])}", _fmt(r["best_reward"]), _fmt(r["kl"], 2),
                    f"{r['wall_seconds'] / 60:.1f} min", _fmt(r["commit"])])
    return out


def plot(rows: list[dict], out_png: Path) -> None:
    """Each run's training reward per step on one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in rows:
        if r["curve"]:
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, label=f"{Path(r['run']).name} ({r['algorithm']})")
    ax.set_xlabel("step")
    ax.set_ylabel("training reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out_png)
