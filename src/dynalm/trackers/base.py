"""What a run sends to an experiment tracker, and the fan-out to the configured ones.

A tracker receives, through one small interface, every metric of metrics.jsonl each step,
the resolved config once, tables (the sample table every `log.samples_every` steps, the
eval and planner tables at the end) and the run directory's report files as artifacts.
Each tracker is one file beside this one, written against its own client library.
"""

from __future__ import annotations

import math
from pathlib import Path


class Tracker:
    """One tracker's client. `run_id` is kept in RUN/trackers.json so a resumed run logs
    into the same tracker run."""

    name = "?"
    run_id: str | None = None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        raise NotImplementedError

    def files(self, paths: list[Path]) -> None:
        """The run's report files (report.md/html, PNGs, tokens.html), uploaded as artifacts."""

    def summary(self, values: dict[str, float]) -> None:
        """End-of-run scalars (final eval). Trackers without a summary get them as a table."""

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError


def scalars(m: dict) -> dict[str, float]:
    """The finite numbers of a metrics row, minus its step (bool counts as a number: 0/1)."""
    out = {}
    for k, v in m.items():
        if k == "step" or not isinstance(v, (int, float)):
            continue
        v = float(v)
        if math.isfinite(v):
            out[k] = v
    return out


class Trackers:
    """The configured trackers as one: a call reaches each in turn."""

    def __init__(self, trackers: list[Tracker]):
        self.items = trackers

    def metrics(self, step: int, m: dict) -> None:
        values = scalars(m)
        for t in self.items:
            t.metrics(step, values)

    def table(self, key: str, columns: list[str], rows: list[list], step: int) -> None:
        for t in self.items:
            t.table(key, columns, rows, step)

    def files(self, paths: list[Path]) -> None:
        paths = [p for p in paths if p.is_file()]
        for t in self.items:
            t.files(paths)

    def summary(self, values: dict[str, float]) -> None:
        for t in self.items:
            t.summary(values)

    def close(self, failed: bool = False) -> None:
        items, self.items = self.items, []  # idempotent: a second close does nothing
        for t in items:
            t.close(failed)

    def run_ids(self) -> dict[str, str]:
        return {t.name: t.run_id for t in self.items if t.run_id}
