"""Experiment trackers (log.report_to): each one run offline on a tiny model and read back
from its own local store; a named tracker that is not installed is refused before any model loads."""

from __future__ import annotations

import glob
import json
import struct
from pathlib import Path

import pytest
import yaml

from dynalm.cli import main
from dynalm.config import build_config

from conftest import tiny_overrides


def _run(tmp_path, tiny_llama, prompts_file, trackers, out="run", steps=2):
    cfg = tiny_overrides(tiny_llama, prompts_file, train={"steps": steps},
                         log={"report_to": trackers, "samples_every": 1, "project": "dynalm-test", "tensorboard": True})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / out
    assert main(["train", "-c", str(tmp_path / "cfg.yaml"), "--out", str(run)]) == 0
    return run


def test_report_to_takes_trl_forms_and_the_old_tensorboard_switch():
    base = {"model": {"name": "x"}}
    assert build_config({**base, "log": {"report_to": "wandb,mlflow"}}).log.trackers == ["wandb", "mlflow"]
    assert build_config({**base, "log": {"report_to": "none"}}).log.trackers == []
    assert build_config({**base, "log": {}}).log.trackers == ["tensorboard"]
    assert build_config({**base, "log": {"tensorboard": False, "report_to": ["tensorboard", "trackio"]}}).log.trackers == ["trackio"]


def test_a_named_tracker_that_is_not_installed_stops_before_the_model_loads(tiny_llama, prompts_file, tmp_path, monkeypatch, capsys):
    import importlib.util

    from dynalm.models.policy import PolicyValueModel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    monkeypatch.setattr(PolicyValueModel, "from_config", classmethod(lambda *a, **k: pytest.fail("the model loaded")))
    cfg = tiny_overrides(tiny_llama, prompts_file)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    argv = ["train", "-c", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--set", "log.report_to=[wandb]"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "dynalm: error: log.report_to names wandb but its client library is not installed "
        "(pip install wandb, or drop wandb from log.report_to)\n"
    )
    assert not (tmp_path / "run").exists()


def _wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): a 7-byte header, then 32 KiB blocks of
    chunks (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_run_holds_metrics_samples_config_and_report(tiny_llama, prompts_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run(tmp_path, tiny_llama, prompts_file, ["wandb"])
    import wandb

    # run.finish() returns before W&B's service process has necessarily written the whole
    # transaction log (CI once read it with step 1 missing); teardown stops the service, which
    # flushes it, as process exit does for a CLI run
    wandb.teardown()
    [log] = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))  # what `wandb sync` uploads
    history, config, artifacts = {}, {}, {}
    for rec in _wandb_records(Path(log)):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "artifact":
            artifacts[rec.artifact.type] = sorted(m.path for m in rec.artifact.manifest.contents)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [m["step"] for m in metrics]
    for m in metrics:
        assert history[m["step"]]["reward"] == pytest.approx(m["reward"]) and history[m["step"]]["kl"] == pytest.approx(m["kl"])
    # a table is a file of its own, named in the history row by flattened keys
    assert history[1]["samples/_type"] == "table-file" and history[1]["samples/nrows"] == 4
    assert history[2]["samples/nrows"] == 4 and history[2]["eval/_type"] == "table-file"  # the eval table at the last step
    [table] = glob.glob(str(Path(log).parent / "files" / history[1]["samples/path"]))
    assert json.loads(Path(table).read_text())["columns"][:3] == ["prompt", "completion", "reward"]
    config.pop("_wandb", None)  # wandb's own bookkeeping
    assert config == yaml.safe_load((run / "config.yaml").read_text())  # the resolved config, every section
    assert artifacts["report"] == ["curves.png", "report.html", "report.md", "tokens.html"]
    assert json.loads((run / "trackers.json").read_text())["wandb"] == Path(log).stem.removeprefix("run-")


def test_trackio_local_store_holds_metrics_samples_and_config(tiny_llama, prompts_file, tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run = _run(tmp_path, tiny_llama, prompts_file, ["trackio"])
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("dynalm-test", run.name)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for row in logs:
        by_step.setdefault(row["step"], {}).update(row)
    for m in metrics:
        assert by_step[m["step"]]["reward"] == pytest.approx(m["reward"])
    samples = by_step[1]["samples"]
    assert samples["_type"] == "trackio.table" and len(samples["_value"]) == 4
    assert {"prompt", "completion", "reward"} <= set(samples["_value"][0])
    assert any("eval" in r for r in logs) and any("final" in r for r in logs)
    assert SQLiteStorage.get_run_config("dynalm-test", run.name)["train"]["steps"] == 2


def test_mlflow_file_store_holds_metrics_tables_config_and_report(tiny_llama, prompts_file, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = _run(tmp_path, tiny_llama, prompts_file, ["mlflow"])
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    rid = json.loads((run / "trackers.json").read_text())["mlflow"]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    hist = {m.step: m.value for m in c.get_metric_history(rid, "reward")}
    assert hist == {m["step"]: pytest.approx(m["reward"]) for m in metrics}
    assert c.get_run(rid).data.params["train.steps"] == "2" and c.get_run(rid).info.status == "FINISHED"
    tables = sorted(a.path for a in c.list_artifacts(rid, "tables"))
    assert tables == ["tables/eval-step000002.json", "tables/samples-step000001.json", "tables/samples-step000002.json"]
    assert sorted(a.path for a in c.list_artifacts(rid, "report")) == [
        "report/curves.png", "report/report.html", "report/report.md", "report/tokens.html"]
    local = Path(c.download_artifacts(rid, "tables/samples-step000001.json", str(tmp_path / "dl")))
    assert len(json.loads(local.read_text())["data"]) == 4


def test_a_resumed_run_and_a_later_eval_log_into_the_same_tracker_run(tiny_llama, prompts_file, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = _run(tmp_path, tiny_llama, prompts_file, ["mlflow", "tensorboard"])
    rid = json.loads((run / "trackers.json").read_text())["mlflow"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["train"]["steps"] = 3  # train one step further
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["train", "--resume", str(run)]) == 0
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    assert json.loads((run / "trackers.json").read_text())["mlflow"] == rid
    assert sorted(m.step for m in c.get_metric_history(rid, "reward")) == [1, 2, 3]
    assert len(c.search_runs([c.get_run(rid).info.experiment_id])) == 1
    assert glob.glob(str(run / "tb" / "events.out.tfevents.*"))
    # `dynalm eval --run` with another planner sends the planner table into the same tracker run
    assert main(["eval", "--run", str(run), "--planner", "greedy"]) == 0
    assert "tables/planners-step000003.json" in [a.path for a in c.list_artifacts(rid, "tables")]
    assert len(c.search_runs([c.get_run(rid).info.experiment_id])) == 1
