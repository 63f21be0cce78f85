"""Atomic checkpoints: written to a temporary folder, flushed, renamed, then `latest` updated.

A checkpoint holds the trainable weights (LoRA + value head, or the full model) in
safetensors and the rest of the run state (optimizer, scheduler, KL controller, step,
RNG states, data position) in `state.pt`. The last K are kept.

A kill at any moment leaves either a complete `step-*` folder or a `.tmp-step-*` one;
`latest_checkpoint` only ever returns complete ones and `clean_partial_checkpoints`
removes the rest when a run is resumed.

Test hook: with the environment variable `DYNALM_CRASH_IN_CHECKPOINT=<step>` the process
dies (`os._exit(137)`, as a SIGKILL would) while writing that step's checkpoint, after the
weights file is written and before the rename. It exists only so tests can show that a
crash mid-checkpoint loses nothing; it does nothing unless set.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CRASH_ENV = "DYNALM_CRASH_IN_CHECKPOINT"


def fsync_path(path: Path) -> None:
    """Flush a folder's (or file's) metadata to disk; best effort where the OS cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)




def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def save_checkpoint(ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    if os.environ.get(CRASH_ENV) == str(step):  # test hook, see the module docstring
        os._exit(137)
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():
        _fsync_file(f)
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(ckpt_root)
    write_text_atomic(ckpt_root / "latest", final.name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(p: Path) -> bool:
    return (p / "state.pt").is_file() and (p / "weights.safetensors").is_file()


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names; else the newest complete `step-*` folder (a `step-*`
    folder only appears by rename once complete, so it is safe to use); else None."""
    ptr = ckpt_root / "latest"
    if ptr.is_file():
        p = ckpt_root / ptr.read_text().strip()
        if p.name.startswith("step-") and _complete(p):
            return p
    done = sorted(p for p in ckpt_root.glob("step-*") if _complete(p))
    return done[-1] if done else None


def clean_partial_checkpoints(ckpt_root: Path) -> None:
    """Remove `.tmp-step-*` folders a killed writer left behind: they were never renamed, so never used."""
    for p in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, map_location="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    weights = load_file(str(path / "weights.safetensors"), device=str(map_location))
    state = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
    return weights, state
