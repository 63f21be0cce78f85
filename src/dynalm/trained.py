"""A trained run read back: its config (with --set overrides, the model fixed) and its
policy with the newest intact checkpoint's weights; used by `dynalm eval`/`generate --run`
and by resume."""

from __future__ import annotations

import sys
from pathlib import Path

from .checkpoint import resume_point
from .config import Config, build_config, deep_merge
from .errors import UserError
from .models.policy import PolicyValueModel
from .rundir import read_run_config


def load_weights(model: PolicyValueModel, weights: dict, ckpt: Path) -> None:
    """Trained weights into the model built from config.yaml; a mismatch means the file was edited."""
    try:
        model.load_trainable_state_dict(weights)
    except (ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(
            f"checkpoint {ckpt} does not fit the model in config.yaml ({first})", "restore the run's original model settings"
        ) from None


def load_run(run_dir: str | Path, cfg_overrides: dict | None = None) -> tuple[Config, PolicyValueModel]:
    """The run's config and its policy with the latest trained weights."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)", "pass the folder printed by `dynalm train`")
    if "model" in (cfg_overrides or {}):
        raise UserError(
            "--set model.* cannot change the model of a trained run", f"evaluate another model with --model, e.g. --model {run_dir}/export"
        )
    cfg = build_config(deep_merge(read_run_config(run_dir), cfg_overrides or {}))
    if not any((run_dir / "checkpoints").glob("step-*")):
        raise UserError(f"run '{run_dir}' has no checkpoint yet", "train it first or resume it")
    model = PolicyValueModel.from_config(cfg)
    found = resume_point(run_dir / "checkpoints", map_location=model.device, warn=lambda s: print(s, file=sys.stderr))
    if found is None:
        raise UserError(f"run '{run_dir}' has no checkpoint yet", "train it first or resume it")
    ckpt, weights, state = found
    load_weights(model, weights, ckpt)
    model.trained_beta = float(state.get("kl", {}).get("value", cfg.kl.coef))
    model.eval()
    return cfg, model
