"""A run directory on disk: what it holds, refusing an --out that would clobber someone's
files, its log files (metrics, samples, TensorBoard), truncating them to a checkpoint, and
reading its config back."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from pathlib import Path

from .checkpoint import write_bytes_atomic
from .config import Config, dump_config, read_yaml
from .errors import UserError

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")

def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.task}-{cfg.algorithm.name}-{stamp}"

RUN_FILES = ("metrics.jsonl", "checkpoints", "samples.jsonl", "tb", "export", "eval.json", "report.md",
             "curves.png", "tokens.html", "transcripts.jsonl", "transitions.jsonl", ".config.yaml.tmp", "config.yaml")


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
    def __init__(self, run_dir: Path, cfg: Config):
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.samples = open(run_dir / "samples.jsonl", "a", encoding="utf-8")
        self.tb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, m: dict) -> None:
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, m["step"])

    def log_samples(self, step: int, batch) -> None:
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
            self.samples.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.samples.flush()

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()

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
