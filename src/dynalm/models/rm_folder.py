"""The folder `dynalm train-rm` writes, read back: `reward_model.json` (config and metrics)
and `reward_model.safetensors` (the trainable weights), checked against their manifest.

One reader for the two users of the format: rewards/learned.py (a learned reward) and
models/critic.py (`model.critic_init`), which cannot import rewards/ (it builds on models/).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..integrity import DamagedFile, check_folder, load_safetensors

WEIGHTS_FILE = "reward_model.safetensors"
META_FILE = "reward_model.json"
FIX = "retrain it with `dynalm train-rm`, or restore the folder from a copy"


def model_dir(path: Path | str) -> Path:
    """The folder, also when given one of its two files."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (WEIGHTS_FILE, META_FILE):
        p = p.parent
    return p


def read_meta(path: Path | str) -> tuple[Path, dict]:
    """The folder and its json, after the files and the manifest are checked."""
    d = model_dir(path)
    meta_p, weights_p = d / META_FILE, d / WEIGHTS_FILE
    if not meta_p.is_file() or not weights_p.is_file():
        raise UserError(
            f"'{path}' is not a saved reward model (needs {META_FILE} and {WEIGHTS_FILE})",
            "train one with `dynalm train-rm` and give its output folder",
        )
    check_folder(d, "reward model", FIX)
    try:
        meta = json.loads(meta_p.read_text(encoding="utf-8"))
        _ = meta["config"]  # a description without a config is not one (KeyError; TypeError for a list)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{meta_p}: not a valid reward model description ({type(exc).__name__})", "retrain the reward model") from None
    return d, meta


def read_weights(d: Path) -> dict:
    try:
        return load_safetensors(d / WEIGHTS_FILE)
    except DamagedFile as exc:
        raise UserError(f"reward model '{d}' is damaged: {exc.reason}", FIX) from None
