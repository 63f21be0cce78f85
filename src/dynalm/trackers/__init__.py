"""Experiment trackers (`log.report_to`, TRL's name): TensorBoard by default; Weights &
Biases, trackio and MLflow through their own client libraries, each an optional extra.

A new tracker is one file here with a `Tracker` subclass and one line in TRACKERS."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

from ..checkpoint import write_text_atomic
from ..errors import UserError
from .base import Tracker, Trackers, scalars

__all__ = ["TRACKERS", "Tracker", "Trackers", "check_trackers", "open_trackers", "scalars"]

# name -> (module of ours, class, the client's import name, what to pip install)
TRACKERS = {
    "tensorboard": ("tensorboard", "TensorBoardTracker", "tensorboard", "tensorboard"),
    "wandb": ("wandb", "WandbTracker", "wandb", "wandb"),
    "trackio": ("trackio", "TrackioTracker", "trackio", "trackio"),
    "mlflow": ("mlflow", "MlflowTracker", "mlflow", "mlflow"),
}
IDS_FILE = "trackers.json"


def check_trackers(names: list[str]) -> None:
    """Every named tracker's client is importable: else one line with the pip command (before any model loads)."""
    for n in names:
        _mod, _cls, client, pip = TRACKERS[n]
        if importlib.util.find_spec(client) is None:
            raise UserError(
                f"log.report_to names {n} but its client library is not installed",
                f"pip install {pip}, or drop {n} from log.report_to",
            )


def open_trackers(run_dir: Path, names: list[str], project: str, config: dict) -> Trackers:
    """Start each tracker's run; a run directory that was logged before (a resume) continues
    the same tracker runs (their ids are in RUN/trackers.json)."""
    check_trackers(names)
    ids_path = run_dir / IDS_FILE
    try:
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    except ValueError:
        ids = {}  # a damaged id file: log as new tracker runs rather than refuse to train
    out = []
    try:
        for n in names:
            mod, cls, _client, _pip = TRACKERS[n]
            tracker_cls = getattr(importlib.import_module(f".{mod}", __name__), cls)
            out.append(tracker_cls(run_dir, run_dir.name, project, config, ids.get(n)))
    except BaseException:
        Trackers(out).close(failed=True)
        raise
    trackers = Trackers(out)
    if trackers.run_ids() != ids and trackers.run_ids():
        write_text_atomic(ids_path, json.dumps({**ids, **trackers.run_ids()}, indent=2))
    return trackers
