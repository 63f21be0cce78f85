"""MLflow through its own client: the store is MLFLOW_TRACKING_URI (MLflow's rule; a
`file:` store needs MLFLOW_ALLOW_FILE_STORE=true since MLflow 3), the experiment is
`log.project`. The config goes up as config.json and as flattened params; tables as JSON
table artifacts; report files under report/."""

from __future__ import annotations

import re
from pathlib import Path

from .base import Tracker

_BAD = re.compile(r"[^A-Za-z0-9_\-. ]")


def _key(k: str) -> str:
    """MLflow's name for a metric: '/' becomes '.' (in a file store 'reward' and
    'reward/relatedness' would be a file and a folder of one name), other odd characters '_'."""
    return _BAD.sub("_", k.replace("/", "."))


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = str(v)[:6000]  # MLflow's limit on a param value
    return out


class MlflowTracker(Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict, run_id: str | None):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        self.run_id = self.run.info.run_id
        if run_id is None:
            mlflow.log_dict(config, "config.json")
            params = _flat(config)
            keys = list(params)
            for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params({_key(k): params[k] for k in keys[i : i + 100]})

    def metrics(self, step, values):
        self.mlflow.log_metrics({_key(k): v for k, v in values.items()}, step=step)

    def table(self, key, columns, rows, step):
        data = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
        self.mlflow.log_table(data, artifact_file=f"tables/{key}-step{step:06d}.json")

    def summary(self, values):
        self.mlflow.log_metrics({_key(k): v for k, v in values.items()})

    def files(self, paths):
        for p in paths:
            self.mlflow.log_artifact(str(p), artifact_path="report")

    def close(self, failed=False):
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")
