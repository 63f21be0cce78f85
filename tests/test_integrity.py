"""Damaged files are detected and answered (issue 19): checkpoints fall back to the newest
intact one, every other file dynalm loads back gives one line, failed writes leave the
previous state intact."""

import errno
import json
import shutil

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynalm.checkpoint import load_checkpoint, resume_point, save_checkpoint
from dynalm.cli import main
from dynalm.config import build_config
from dynalm.errors import UserError
from dynalm.integrity import MANIFEST, verify_folder
from dynalm.run import train

from conftest import tiny_overrides

FILES = ("weights.safetensors", "state.pt", MANIFEST)


def _weights(step):
    g = torch.Generator().manual_seed(step)
    return {"a.weight": torch.randn(8, 4, generator=g), "b.bias": torch.randn(3, generator=g)}


def _state(step):
    return {"step": step, "opt": {"m": torch.full((5,), float(step))}, "rng": list(range(step))}


def _ckpts(root, steps=(1, 2, 3)):
    for s in steps:
        save_checkpoint(root, s, _weights(s), _state(s), keep=len(steps), meta={"config_sha256": "x" * 64})
    return root


def damage(path, mode, where=0.5):
    data = bytearray(path.read_bytes())
    if mode == "truncate":
        data = data[: int(len(data) * where)]
    elif mode == "zero":
        i = int(len(data) * where)
        data[i : i + 64] = bytes(len(data[i : i + 64]))
    elif mode == "flip" and data:
        data[min(int(len(data) * where), len(data) - 1)] ^= 0xFF
    elif mode == "empty":
        data = b""
    path.write_bytes(bytes(data))


def _same(found, step):
    path, w, s = found
    assert path.name == f"step-{step:06d}"
    ref = _weights(step)
    assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)
    assert s["step"] == step and torch.equal(s["opt"]["m"], _state(step)["opt"]["m"]) and s["rng"] == _state(step)["rng"]


def test_the_manifest_lists_every_file_with_size_and_hash(tmp_path):
    root = _ckpts(tmp_path / "checkpoints")
    man = json.loads((root / "step-000003" / MANIFEST).read_text())
    assert sorted(man["files"]) == ["state.pt", "weights.safetensors"]
    assert man["step"] == 3 and man["dynalm_version"] and man["config_sha256"] == "x" * 64
    w = root / "step-000003" / "weights.safetensors"
    assert man["files"]["weights.safetensors"]["size"] == w.stat().st_size
    assert verify_folder(root / "step-000003") == []


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("mode", ["truncate", "zero", "flip", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, name, mode):
    root = _ckpts(tmp_path / "checkpoints")
    damage(root / "step-000003" / name, mode)
    said = []
    _same(resume_point(root, warn=said.append), 2)
    assert len(said) == 1 and said[0].startswith("warning: checkpoint step-000003 is damaged (") and name in said[0]
    assert said[0].endswith("; trying the one before it")


def test_sizes_only_without_verification(tmp_path):
    root = _ckpts(tmp_path / "checkpoints")
    w = root / "step-000003" / "weights.safetensors"
    damage(w, "flip", 0.99)  # inside the tensor data: only the hash sees it
    _same(resume_point(root, warn=lambda s: None), 2)
    path, _, _ = resume_point(root, verify=False, warn=lambda s: None)
    assert path.name == "step-000003"
    damage(w, "truncate")
    assert resume_point(root, verify=False, warn=lambda s: None)[0].name == "step-000002"


@pytest.mark.parametrize("mode", ["truncate", "zero", "flip", "empty"])
def test_a_damaged_latest_pointer_uses_the_newest_intact_checkpoint(tmp_path, mode):
    root = _ckpts(tmp_path / "checkpoints")
    damage(root / "latest", mode, 0.3)
    said = []
    _same(resume_point(root, warn=said.append), 3)
    assert said == [f"warning: {root / 'latest'} is damaged or names no checkpoint; trying the checkpoints newest first"]


def test_every_checkpoint_damaged_is_one_error_and_nothing_is_deleted(tmp_path):
    root = _ckpts(tmp_path / "checkpoints", steps=(1, 2))
    damage(root / "step-000002" / "state.pt", "truncate")
    damage(root / "step-000001" / "weights.safetensors", "flip", 0.9)
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    with pytest.raises(UserError) as e:
        resume_point(root, warn=lambda s: None)
    line = e.value.line()
    assert line.startswith(f"every checkpoint of {tmp_path} is damaged (checkpoints/step-000002: state.pt (")
    assert "checkpoints/step-000001: weights.safetensors (SHA-256 differs from the manifest)" in line
    assert line.endswith("--force (nothing was deleted))")
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_checkpoint_from_before_manifests_still_loads_and_a_broken_one_falls_back(tmp_path):
    root = _ckpts(tmp_path / "checkpoints")
    for s in (2, 3):
        (root / f"step-{s:06d}" / MANIFEST).unlink()
    _same(resume_point(root, warn=lambda s: None), 3)
    damage(root / "step-000003" / "weights.safetensors", "truncate")  # unverifiable, but it fails to load
    said = []
    _same(resume_point(root, warn=said.append), 2)
    assert said[0].startswith("warning: checkpoint step-000003 is damaged (weights.safetensors: ")


DAMAGE = st.lists(
    st.tuples(st.sampled_from([1, 2, 3]), st.sampled_from(FILES + ("latest",)),
              st.sampled_from(["truncate", "zero", "flip", "empty"]), st.floats(0.0, 0.999)),
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(DAMAGE)
def test_any_damage_resumes_exactly_from_an_intact_checkpoint_or_says_why(tmp_path_factory, hits):
    """Property: after any damage, resume either returns exactly what an intact checkpoint
    held — the newest one whose files are unchanged — or raises one UserError."""
    root = _ckpts(tmp_path_factory.mktemp("ck") / "checkpoints")
    orig = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for step, name, mode, where in hits:
        damage(root / "latest" if name == "latest" else root / f"step-{step:06d}" / name, mode, where)
    intact = [s for s in (1, 2, 3) if all(p.read_bytes() == orig[p] for p in (root / f"step-{s:06d}").iterdir())]
    try:
        found = resume_point(root, warn=lambda s: None)
    except UserError:
        assert not intact, "an intact checkpoint was passed over"
        return
    assert intact, "a damaged checkpoint was trusted"
    _same(found, max(intact))


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    root = _ckpts(tmp_path / "checkpoints", steps=(1, 2))
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    for err, why in ((OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
                     (PermissionError(errno.EACCES, "Permission denied"), "permission denied")):
        def boom(*a, err=err, **k):
            raise err

        monkeypatch.setattr("dynalm.checkpoint.torch.save", boom)
        with pytest.raises(UserError) as e:
            save_checkpoint(root, 3, _weights(3), _state(3), keep=2)
        assert e.value.what == f"could not write checkpoint {root / 'step-000003'} ({why})"
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # no .tmp left, latest unchanged
        assert load_checkpoint(root / "step-000002")[1]["step"] == 2


# ----------------------------------------------------------------------------- end to end


def _run_cfg(tiny_llama, prompts_file, tmp_path, steps):
    over = tiny_overrides(tiny_llama, prompts_file, train={"steps": steps, "batch_size": 4},
                          log={"checkpoint_every": 1, "keep_checkpoints": 2}, eval={"enabled": False})
    p = tmp_path / f"c{steps}.yaml"
    p.write_text(yaml.safe_dump(over))
    return over, p


def _metrics(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]


def test_resume_falls_back_past_a_damaged_checkpoint_and_ends_exactly(tiny_llama, prompts_file, tmp_path, capsys):
    _, c4 = _run_cfg(tiny_llama, prompts_file, tmp_path, 4)
    full = tmp_path / "full"
    assert main(["train", "-c", str(c4), "--out", str(full)]) == 0
    over3, _ = _run_cfg(tiny_llama, prompts_file, tmp_path, 3)
    part = train(build_config(over3), tmp_path / "part", echo=lambda s: None)
    damage(part / "checkpoints" / "step-000003" / "weights.safetensors", "truncate")
    (part / "config.yaml").write_text((part / "config.yaml").read_text().replace("steps: 3", "steps: 4"))
    capsys.readouterr()
    assert main(["train", "--resume", str(part)]) == 0
    out = capsys.readouterr().out
    assert "warning: checkpoint step-000003 is damaged (weights.safetensors (" in out
    assert "resuming " + str(part) + " from step-000002 (step 2)" in out
    assert _metrics(part) == _metrics(full)


def test_resume_with_every_checkpoint_damaged_is_one_line_exit_2(tiny_llama, prompts_file, tmp_path, capsys):
    over3, _ = _run_cfg(tiny_llama, prompts_file, tmp_path, 3)
    part = train(build_config(over3), tmp_path / "part", echo=lambda s: None)
    for d in (part / "checkpoints").glob("step-*"):
        damage(d / "state.pt", "zero", 0.2)
    before = {p: p.read_bytes() for p in part.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(part)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynalm: error: every checkpoint of {part} is damaged (") and err.count("\n") == 1
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in part.rglob("*") if p.is_file()} == before
    # eval of the damaged run answers the same way
    assert main(["eval", "--run", str(part)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith(f"dynalm: error: every checkpoint of {part} is damaged (")
    assert all(x.startswith("warning: checkpoint step-") for x in lines[:-1])


@pytest.mark.parametrize("mode", ["truncate", "zero", "empty", "cut_at_a_line"])
def test_a_damaged_config_yaml_is_one_line(tiny_llama, prompts_file, tmp_path, capsys, mode):
    over3, _ = _run_cfg(tiny_llama, prompts_file, tmp_path, 2)
    part = train(build_config(over3), tmp_path / "part", echo=lambda s: None)
    cfg_file = part / "config.yaml"
    if mode == "cut_at_a_line":  # still valid YAML, but the later sections are gone
        lines = cfg_file.read_text().splitlines(keepends=True)
        cfg_file.write_text("".join(lines[: next(i for i, x in enumerate(lines) if x.startswith("algorithm:"))]))
    else:
        damage(cfg_file, mode, 0.4)
    capsys.readouterr()
    code = main(["train", "--resume", str(part)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    bad_yaml = err.startswith(f"dynalm: error: config file '{part / 'config.yaml'}' is not valid YAML: ")
    # valid YAML that lost sections: refused, not filled with defaults (the default model would load)
    lost = err.startswith(f"dynalm: error: {part / 'config.yaml'} is damaged: it lacks the sections ")
    assert {"zero": bad_yaml, "empty": lost, "truncate": bad_yaml or lost, "cut_at_a_line": lost}[mode], err


def test_a_damaged_export_and_reward_model_are_one_line(tiny_llama, prompts_file, tmp_path, capsys):
    from dynalm.rewards.learned import RewardModel, RewardModelConfig, learned_reward, save_reward_model

    over, _ = _run_cfg(tiny_llama, prompts_file, tmp_path, 1)
    run = train(build_config(over), tmp_path / "run", echo=lambda s: None)
    assert verify_folder(run / "export") == [] and (run / "export" / MANIFEST).is_file()
    damage(run / "export" / "model.safetensors", "truncate")
    capsys.readouterr()
    assert main(["generate", "--model", str(run / "export"), "--prompt", "the cat"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dynalm: error: model folder '{run / 'export'}' is damaged: model.safetensors (") and err.count("\n") == 1

    rm = save_reward_model(RewardModel.build(RewardModelConfig(model=str(tiny_llama), lora_r=2, data="x.jsonl")), tmp_path / "rm")
    assert learned_reward(rm)(prompts=["the"], completions=["cat"])
    damage(rm / "reward_model.safetensors", "flip", 0.95)
    with pytest.raises(UserError, match=r"reward model '.*rm' is damaged: reward_model.safetensors \(SHA-256 differs"):
        learned_reward(rm)


def test_a_failed_export_or_report_write_is_one_line_and_keeps_the_checkpoints(tiny_llama, prompts_file, tmp_path, capsys, monkeypatch):
    from dynalm.models.policy import PolicyValueModel

    _, c = _run_cfg(tiny_llama, prompts_file, tmp_path, 1)

    def no_space(self, out_dir):
        (out_dir / "partial.bin").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "partial.bin").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PolicyValueModel, "export", no_space)
    run = tmp_path / "run"
    assert main(["train", "-c", str(c), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (f"dynalm: error: could not write the export {run / 'export'} (no space left on the device) "
                   f"(free space on that disk or fix its permissions; the checkpoints are intact: dynalm train --resume {run})\n")
    assert not (run / "export").exists() and not (run / ".export.tmp").exists()
    assert verify_folder(run / "checkpoints" / "step-000001") == []
    monkeypatch.undo()

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("dynalm.run.finalize_report", denied)
    shutil.rmtree(run)
    assert main(["train", "-c", str(c), "--out", str(run)]) == 2
    assert capsys.readouterr().err.startswith(f"dynalm: error: could not write the report {run / 'report.md'} (permission denied)")


def test_a_resume_sets_damaged_checkpoints_aside_and_pruning_keeps_the_new_one(tmp_path):
    """Review finding: a damaged newer checkpoint left in place took a slot of
    log.keep_checkpoints, so the next save deleted the intact one (or itself)."""
    root = _ckpts(tmp_path / "checkpoints", steps=(1, 2, 3))
    damage(root / "step-000003" / "state.pt", "truncate")
    said = []
    _same(resume_point(root, warn=said.append, set_aside=True), 2)
    assert said[-1] == "warning: moved aside (not deleted): damaged-step-000003"
    assert (root / "damaged-step-000003" / "state.pt").is_file() and not (root / "step-000003").exists()
    save_checkpoint(root, 3, _weights(3), _state(3), keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["damaged-step-000003", "step-000002", "step-000003"]
    # a folder after the one written (a fallback past an intact newer one) is neither counted nor deleted
    save_checkpoint(root, 9, _weights(9), _state(9), keep=2)
    save_checkpoint(root, 4, _weights(4), _state(4), keep=1)
    assert sorted(p.name for p in root.glob("step-*")) == ["step-000004", "step-000009"]
