"""A run directory on disk: what it holds, refusing an --out that would clobber someone's
files, its log files (metrics, samples, TensorBoard), truncating them to a checkpoint, and
reading its config back."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

from .checkpoint import write_bytes_atomic
from .config import Config, dump_config, read_yaml
from .errors import UserError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")

def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.task}-{cfg.algorithm.name}-{stamp}"

RUN_FILES = ("metrics.jsonl", "checkpoints", "samples.jsonl", "tb", "wandb", "trackers.json", "export", "eval.json",
             "report.md", "report.html", "curves.png", "tokens.html", "transcripts.jsonl", "transitions.jsonl",
             ".config.yaml.tmp", "config.yaml")
REPORT_FILES = ("report.md", "report.html", "curves.png", "tokens.html")


def check_run_dir(out: Path, *, force: bool) -> None:
    """Refuse an --out that holds a run (unless forced) or files a run would overwrite; changes nothing."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file", "pick a folder for the run")
    if out.exists() and not (out / "config.yaml").exists():
        # (a lone .config.yaml.tmp is ours: what a kill before config.yaml leaves behind)
        clash = [m for m in RUN_FILES if m != ".config.yaml.tmp" and (out / m).exists()]
        if clash:  # not a run of ours: never delete a user's files, even with --force
            raise UserError(f"'{out}' holds '{clash[0]}' but is not a dynalm run", "pick an empty or new --out folder")
    if out.exists() and any((out / m).exists() for m in RUN_MARKERS) and not force:
        raise UserError(
            f"'{out}' already holds a run", "pick another --out, resume it with --resume, or pass --force to overwrite"
        )


def prepare_run_dir(out: Path, *, force: bool) -> None:
    check_run_dir(out, force=force)
    if out.exists() and force and (out / "config.yaml").exists():
        # config.yaml goes last: a --force killed midway leaves a folder that is still a
        # run (refused without --force) rather than a half-deleted one that looks empty.
        for m in RUN_FILES:
            p = out / m
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of steps ≤ max_step (those the checkpoint covers).

    A kill -9 can leave the last line half written: it is dropped. Lines are split at
    newline bytes only: str.splitlines() would also split inside samples' text (U+2028, ...).
    """
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    keep = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:  # JSONDecodeError, or a UTF-8 sequence cut in half
            rec = None
        if not isinstance(rec, dict):
            if i == last:
                break
            raise UserError(f"{path}: line {i + 1} is damaged (not a JSON object)", "delete that line and resume again")
        if rec.get("step", 0) <= max_step:
            keep.append(ln + b"\n")
    write_bytes_atomic(path, b"".join(keep))

class _Logger:
    """metrics.jsonl and samples.jsonl, and the same to the configured experiment trackers."""

    def __init__(self, run_dir: Path, cfg: Config):
        from .trackers import open_trackers

        self.run_dir = run_dir
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.samples = open(run_dir / "samples.jsonl", "a", encoding="utf-8")
        self.trackers = open_trackers(run_dir, cfg.log.trackers, cfg.log.project, cfg.model_dump(mode="json"))

    def log(self, m: dict) -> None:
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        self.trackers.metrics(m["step"], m)

    def log_samples(self, step: int, batch) -> None:
        recs = []
        for i in range(len(batch)):
            rec = {
                "step": step,
                "prompt": batch.prompts[i],
                "completion": batch.completions[i],
                "reward": float(batch.scores[i]),
            }
            terms = {k: float(v[i]) for k, v in batch.reward_terms.items()}
            if any(math.isnan(x) for x in terms.values()):  # Dyna: scored by the learned model
                rec["scored_by"] = "model"
            else:
                rec.update(terms)
            recs.append(rec)
            self.samples.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.samples.flush()
        if self.trackers.items:
            cols = list(dict.fromkeys(k for r in recs for k in r if k != "step"))
            self.trackers.table("samples", cols, [[r.get(c) for c in cols] for r in recs], step)

    def finish(self, eval_result: dict | None, step: int) -> None:
        """The end of a run: see `publish_results`; then the trackers' runs are closed."""
        publish_results(self.trackers, self.run_dir, eval_result, step)
        self.trackers.close()

    def close(self, failed: bool = False) -> None:
        """Close the log files; a failed or stopped run also closes the trackers (marked failed)."""
        if not self.metrics.closed:
            self.metrics.close()
            self.samples.close()
        if failed:
            self.trackers.close(failed=True)

def publish_results(trackers, run_dir: Path, eval_result: dict | None, step: int) -> None:
    """The eval and planner tables, the final eval as summary scalars, and the report files
    as artifacts, to every tracker."""
    from .evaluate import summary_rows
    from .report import planner_rows

    if trackers.items and eval_result:
        trackers.table("eval", *summary_rows(eval_result), step)
        planners = planner_rows(run_dir, eval_result)
        if planners:
            trackers.table("planners", *planners, step)
        trackers.summary(
            {f"final_eval/{side}/{k}": float(v) for side in ("base", "trained") if side in eval_result
             for k, v in eval_result[side].items() if isinstance(v, (int, float)) and math.isfinite(v)}
        )
    trackers.files([run_dir / n for n in REPORT_FILES])


def publish_eval(run_dir: Path, cfg: Config, eval_result: dict | None) -> None:
    """After `dynalm eval --run RUN`: the trackers' runs of RUN are continued to take the new
    planner table and report (at the run's last step); a run never logged to them is left alone."""
    from .trackers import IDS_FILE, check_trackers, open_trackers

    try:
        ids = json.loads((run_dir / IDS_FILE).read_text()) if (run_dir / IDS_FILE).is_file() else {}
    except ValueError:
        ids = {}
    names = [n for n in cfg.log.trackers if n == "tensorboard" or n in ids]
    try:
        check_trackers(names)
    except UserError as err:  # the eval is written; say what did not reach the tracker
        print(f"note: the eval is not sent to the run's trackers: {err.line()}", file=sys.stderr)
        return
    if not names:
        return
    metrics = run_dir / "metrics.jsonl"
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()] if metrics.is_file() else []
    step = json.loads(lines[-1]).get("step", 0) if lines else 0
    trackers = open_trackers(run_dir, names, cfg.log.project, cfg.model_dump(mode="json"))
    try:
        publish_results(trackers, run_dir, eval_result, step)
    finally:
        trackers.close()


def read_run_config(run_dir: Path) -> dict:
    """A run's config.yaml, which dynalm writes whole (every section): one that lost
    sections was cut short (a full disk, a partial copy), not edited, and is refused
    rather than silently filled with defaults."""
    path = run_dir / "config.yaml"
    data = read_yaml(path)
    missing = [k for k in Config.model_fields if k not in data]
    if missing:
        raise UserError(
            f"{path} is damaged: it lacks the sections {', '.join(missing)} that dynalm writes",
            "restore it from a copy; checkpoints/*/manifest.json holds the SHA-256 of the original",
        )
    return data


def source_commit() -> str | None:
    """The git commit of the dynalm source that is running (short hash, "+dirty" with local
    changes); None outside a git checkout. Computed once per process."""
    global _COMMIT
    if _COMMIT is None:
        import subprocess

        src = Path(__file__).resolve().parent
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
            dirty = subprocess.run(["git", "status", "--porcelain", "--", str(src)], cwd=src, capture_output=True, text=True, timeout=5)
            _COMMIT = head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else ""
        except (OSError, subprocess.SubprocessError):
            _COMMIT = ""
    return _COMMIT or None


_COMMIT: str | None = None


def config_sha256(cfg: Config) -> str:
    return hashlib.sha256(dump_config(cfg).encode("utf-8")).hexdigest()
