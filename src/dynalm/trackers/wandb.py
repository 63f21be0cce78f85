"""Weights & Biases through the `wandb` client. The run's files go under RUN/wandb; with
WANDB_MODE=offline nothing leaves the machine and `wandb sync RUN/wandb/offline-run-*`
uploads it later. A resumed dynalm run continues the same W&B run (its id is kept)."""

from __future__ import annotations

from pathlib import Path

from .base import Tracker


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict, run_id: str | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=run_name, dir=str(run_dir), config=config, id=run_id, resume="allow" if run_id else None,
        )
        self.run_id = self.run.id

    def metrics(self, step, values):
        self.run.log(values, step=step)

    def table(self, key, columns, rows, step):
        self.run.log({key: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, values):
        self.run.summary.update(values)

    def files(self, paths):
        art = self.wandb.Artifact(f"report-{self.run.id}", type="report")
        for p in paths:
            art.add_file(str(p))
        self.run.log_artifact(art)

    def close(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)
