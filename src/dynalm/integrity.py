"""What dynalm writes, it can check before it trusts it again.

Every folder dynalm saves and later loads back — a checkpoint, a run's `export/`, a reward
model from `train-rm` — gets a `manifest.json`, written last inside the temporary folder
before the rename that publishes it: each file's size and SHA-256, the dynalm version and
whatever the writer adds (the step, the config hash). `verify_folder` compares a folder
with its manifest: sizes always (cheap: catches a truncated copy or a disk that filled),
hashes unless told not to (catches flipped bytes; costs one read of every file).

Loading never ends in a traceback: a file that fails to deserialize raises `DamagedFile`
(naming it and why), which callers turn into a fallback or one `dynalm: error:` line.
`write_guard` does the same for writes: a full disk or a permission error becomes one line
naming the path, with the previous state left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

from . import __version__
from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = 1


class DamagedFile(Exception):
    """A file dynalm wrote no longer reads back (`path`, `reason`)."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(folder: Path, **meta) -> dict:
    """List every file under `folder` (sizes and SHA-256) in `folder/manifest.json`, flushed."""
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256(p)}
    man = {"format": FORMAT, "dynalm_version": __version__, **meta, "files": files}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(man, indent=1, sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return man


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest; None when it has none (written before manifests existed)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise ValueError("no file list")
        for name, entry in man["files"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
                raise ValueError(f"bad entry for {name}")
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DamagedFile(path, f"unreadable manifest ({type(exc).__name__})") from None
    return man


def verify_folder(folder: Path, *, hashes: bool = True, required: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with `folder` against its manifest, one entry per damaged file (empty:
    intact). Without a manifest only `required` files are checked to exist."""
    try:
        man = read_manifest(folder)
    except DamagedFile as exc:
        return [f"{MANIFEST} ({exc.reason})"]
    problems = [f"{name} (missing)" for name in required if not (folder / name).is_file()]
    if man is None:
        return problems
    for name, entry in man["files"].items():
        p = folder / name
        if not p.is_file():
            if name not in required:
                problems.append(f"{name} (missing)")
            continue
        size = p.stat().st_size
        if size != entry["size"]:
            problems.append(f"{name} ({size} bytes, the manifest says {entry['size']})")
        elif hashes and sha256(p) != entry["sha256"]:
            problems.append(f"{name} (SHA-256 differs from the manifest)")
    return problems


def check_folder(folder: Path, what: str, fix: str, *, hashes: bool = True, required: tuple[str, ...] = ()) -> None:
    """`verify_folder`, as one `dynalm: error:` line when anything is damaged."""
    problems = verify_folder(folder, hashes=hashes, required=required)
    if problems:
        raise UserError(f"{what} '{folder}' is damaged: {', '.join(problems)}", fix)


def load_safetensors(path: Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error types, OSError or ValueError
        raise DamagedFile(path, _first_line(exc)) from None


def load_torch(path: Path, map_location="cpu"):
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a damaged pickle raises anything from EOFError to UnpicklingError
        raise DamagedFile(path, _first_line(exc)) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


@contextlib.contextmanager
def write_guard(path: Path, what: str, fix: str):
    """Turn an OSError while writing `what` at `path` into one line. The writer itself must
    leave the previous state intact (write to a temporary name, rename last)."""
    try:
        yield
    except OSError as exc:
        reason = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror or type(exc).__name__)
        raise UserError(f"could not write {what} {path} ({reason})", fix) from None
