"""trackio (Hugging Face's local-first tracker) through its own client: metrics and tables
go to its local store (TRACKIO_DIR, default ~/.cache/huggingface/trackio), viewed with
`trackio show --project P`. A resumed dynalm run continues the run of the same name."""

from __future__ import annotations

from pathlib import Path

from .base import Tracker


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict, run_id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project, name=run_id or run_name, config=config, resume="allow" if run_id else "never",
            embed=False, auto_log_cpu=False, auto_log_gpu=False,
        )
        self.run_id = run_id or run_name

    def metrics(self, step, values):
        self.trackio.log(values, step=step)

    def table(self, key, columns, rows, step):
        self.trackio.log({key: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values):
        # trackio has no run summary: the final scalars go up as one table at the next step
        self.trackio.log({"final": self.trackio.Table(columns=["metric", "value"], data=[[k, v] for k, v in values.items()])})

    def files(self, paths):
        for p in paths:
            self.trackio.log_artifact(p, name=f"{self.run_id}-{p.name}".replace(".", "-"), type="report")

    def close(self, failed=False):
        self.trackio.finish()
