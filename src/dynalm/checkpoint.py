"""Atomic checkpoints: written to a temporary folder, flushed, renamed, then `latest` updated.

A checkpoint holds the trainable weights (LoRA + value head, or the full model) in
safetensors and the rest of the run state (optimizer, scheduler, KL controller, step,
RNG states, data position) in `state.pt`, and `manifest.json` (integrity.py: every file's
size and SHA-256, the step, the dynalm version, the config hash), written last inside the
temporary folder. The last K are kept.

Resuming verifies before it trusts (`resume_point`): the checkpoint `latest` names, then
the others newest first; one that fails its manifest or fails to deserialize is reported
in one line and passed over; when none is intact the run stops with one line naming the
damaged files, and nothing is deleted. A checkpoint written before manifests existed is
loaded unverified (a failure to deserialize still falls back).

A kill at any moment leaves either a complete `step-*` folder or a `.tmp-step-*` one;
`resume_point` only ever returns complete ones and `clean_partial_checkpoints`
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
from safetensors.torch import save_file

from .errors import UserError
from .integrity import DamagedFile, load_safetensors, load_torch, verify_folder, write_guard, write_manifest

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


def publish_folder(out_dir: Path | str, files: dict, kind: str) -> Path:
    """Write a small model folder atomically: `files` (name → a function that writes that
    file at the path it is given) go to a temporary folder beside `out_dir`, are flushed and
    listed in a manifest, and the folder is renamed into place; into an existing `out_dir`
    each file is renamed, in the given order, the manifest last. A failure leaves
    `out_dir` as it was."""
    import tempfile

    from .integrity import MANIFEST

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
            fsync_path(tmp / name)
        write_manifest(tmp, kind=kind)
        fsync_path(tmp)
        if not out_dir.exists():
            os.replace(tmp, out_dir)
        else:
            for name in [*files, MANIFEST]:
                os.replace(tmp / name, out_dir / name)
            fsync_path(out_dir)
            tmp.rmdir()
        fsync_path(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_checkpoint(
    ckpt_root: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int, meta: dict | None = None
) -> Path:
    """Write `step-NNNNNN` atomically; a full disk or a permission error is one line and
    leaves the previous checkpoints and `latest` as they were."""
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    fix = f"free space on that disk or fix its permissions, then: dynalm train --resume {ckpt_root.parent}"
    try:
        with write_guard(final, "checkpoint", fix):
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
            if os.environ.get(CRASH_ENV) == str(step):  # test hook, see the module docstring
                os._exit(137)
            torch.save(state, tmp / "state.pt")
            for f in tmp.iterdir():
                _fsync_file(f)
            write_manifest(tmp, step=step, **(meta or {}))
            fsync_path(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_path(ckpt_root)
            write_text_atomic(ckpt_root / "latest", final.name + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # keep `final` and the keep − 1 before it; folders after it (left by a resume that fell
    # back past them) are not counted and not deleted: the run overwrites them when it gets there
    older = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name < final.name)
    for old in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def clean_partial_checkpoints(ckpt_root: Path) -> None:
    """Remove `.tmp-step-*` folders a killed writer left behind: they were never renamed, so never used."""
    for p in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, map_location="cpu", *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of one checkpoint; `DamagedFile` when it fails its manifest (sizes
    always, SHA-256 when `verify`) or does not deserialize."""
    problems = verify_folder(path, hashes=verify, required=("weights.safetensors", "state.pt"))
    if problems:
        raise DamagedFile(path, ", ".join(problems))
    try:
        weights = load_safetensors(path / "weights.safetensors", device=str(map_location))
        state = load_torch(path / "state.pt", map_location=map_location)
    except DamagedFile as exc:
        raise DamagedFile(path, f"{exc.path.name}: {exc.reason}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise DamagedFile(path, "state.pt: not a dynalm training state")
    return weights, state


def _candidates(ckpt_root: Path, warn) -> list[Path]:
    """The checkpoint `latest` names first, then every other `step-*` folder, newest first."""
    folders = sorted((p for p in ckpt_root.glob("step-*") if p.is_dir()), reverse=True)
    ptr = ckpt_root / "latest"
    if ptr.exists():
        try:
            named = ckpt_root / ptr.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            named = None
        if named is not None and named.name.startswith("step-") and named in folders:
            return [named] + [p for p in folders if p != named]
        if folders:
            warn(f"warning: {ptr} is damaged or names no checkpoint; trying the checkpoints newest first")
    return folders


def resume_point(ckpt_root: Path, *, verify: bool = True, map_location="cpu", warn=print, set_aside: bool = False):
    """(path, weights, state) of the newest intact checkpoint, None when the run has none;
    damaged ones are named in one line each and passed over; all damaged → `UserError`.
    With `set_aside` (a resuming run), the damaged ones passed over are renamed
    `damaged-step-*` — kept for inspection, out of the run's way."""
    damaged = []
    for p in _candidates(ckpt_root, warn):
        try:
            weights, state = load_checkpoint(p, map_location, verify=verify)
        except DamagedFile as exc:
            damaged.append(exc)
            warn(f"warning: checkpoint {p.name} is damaged ({exc.reason}); trying the one before it")
            continue
        if set_aside and damaged:
            for d in damaged:
                aside = d.path.with_name(f"damaged-{d.path.name}")
                shutil.rmtree(aside, ignore_errors=True)
                d.path.rename(aside)
            warn(f"warning: moved aside (not deleted): {', '.join(f'damaged-{d.path.name}' for d in damaged)}")
        return p, weights, state
    if damaged:
        names = "; ".join(f"{d.path.relative_to(ckpt_root.parent)}: {d.reason}" for d in damaged)
        raise UserError(
            f"every checkpoint of {ckpt_root.parent} is damaged ({names})",
            f"restore them from a copy, or start over with: dynalm train -c {ckpt_root.parent / 'config.yaml'} "
            f"--out {ckpt_root.parent} --force (nothing was deleted)",
        )
    return None
