"""`dynalm train-env-model`: fit the environment model on recorded transitions, measure it
on held-out episodes against the same base model prompted as the simulator, save it.

Saved (atomically: a temporary folder renamed into place, a manifest written last) as
`env_model.safetensors` (the adapter and the heads) and `env_model.json` (the settings,
the reward scale, the environment's openings and the metrics); `load_env_model(path)`
reads the folder back.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import publish_folder
from ..errors import UserError
from ..integrity import DamagedFile, check_folder, load_safetensors
from ..rewards.rm_training import pearson
from .data import openings, read_transitions, split_by_episode
from .network import EnvModel, EnvModelConfig

WEIGHTS_FILE = "env_model.safetensors"
META_FILE = "env_model.json"
FORMAT_VERSION = 1
FIX = "train one with `dynalm train-env-model --data RUN/transitions.jsonl --out DIR` and give that folder"


@torch.no_grad()
def evaluate_env_model(model: EnvModel, rows: list[dict], batch_size: int = 8, *, base: bool = False) -> dict:
    """Next-observation NLL per token and perplexity; with the heads (not `base`): reward
    Pearson r and MAE, termination accuracy. `base`: the adapter off (the prompted LM)."""
    was = model.training
    model.eval()
    nll = tok = 0.0
    pred, done = [], []
    try:
        for i in range(0, len(rows), batch_size):
            out = model.forward_rows(rows[i : i + batch_size], base=base)
            nll += float(out["nll"].sum())
            tok += float(out["tokens"].sum())
            pred += model.reward_of(out["reward_z"]).tolist()
            done += (out["done_logit"] > 0).tolist()
    finally:
        model.train(was)
    res = {"observation_tokens": int(tok), "nll_per_token": nll / tok if tok else None,
           "perplexity": math.exp(nll / tok) if tok else None}
    if base:
        return res
    target = [float(r["reward"]) for r in rows]
    labels = [bool(r["terminated"]) for r in rows]
    res.update(
        reward_pearson=pearson(pred, target),
        reward_mae=sum(abs(p - t) for p, t in zip(pred, target)) / len(rows),
        termination_accuracy=sum(p == t for p, t in zip(done, labels)) / len(rows),
    )
    return res


def _baselines(train: list[dict], held: list[dict]) -> dict:
    """What a model that knows only the training rewards' mean and the commoner ending scores."""
    mean = sum(float(r["reward"]) for r in train) / len(train)
    share = sum(bool(r["terminated"]) for r in train) / len(train)
    majority = share >= 0.5
    return {"reward_mae_of_the_mean": sum(abs(float(r["reward"]) - mean) for r in held) / len(held),
            "termination_accuracy_of_the_majority": sum(bool(r["terminated"]) == majority for r in held) / len(held)}


def train_env_model(cfg: EnvModelConfig, out_dir: Path | str, echo: Callable[[str], None] = print) -> dict:
    import time

    t_start = time.perf_counter()
    rows = read_transitions(cfg.data)
    train, held = split_by_episode(rows, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError(f"{cfg.data}: {len(rows)} transition(s) are too few to hold out {cfg.eval_fraction:g} of the episodes",
                        "record more episodes or lower eval_fraction")
    eval_rows, eval_on = (held, "heldout") if held else (train, "train")
    n_ep = lambda rs: len({str(r["episode"]) for r in rs})  # noqa: E731
    echo(f"environment model: {len(train)} training transitions ({n_ep(train)} episodes), {len(held)} held out "
         f"({n_ep(held)} episodes) from {cfg.data}")
    model = EnvModel.build(cfg)
    rs = [float(r["reward"]) for r in train]
    model.reward_mean = sum(rs) / len(rs)
    sd = math.sqrt(sum((x - model.reward_mean) ** 2 for x in rs) / len(rs))
    model.reward_std = sd if sd > 1e-8 else 1.0
    model.note_observations(train)
    base = evaluate_env_model(model, eval_rows, cfg.batch_size, base=True)
    echo(f"prompted base model ({eval_on}): next-observation NLL {base['nll_per_token']:.4f}/token")

    opt = torch.optim.Adam(model.parameters_to_train(), lr=cfg.learning_rate)
    order_rng = random.Random(cfg.seed + 1)
    steps, last = 0, {}
    model.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        order_rng.shuffle(order)
        parts = []
        for i in range(0, len(order), cfg.batch_size):
            loss, part = model.loss([train[j] for j in order[i : i + cfg.batch_size]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            parts.append(part)
            steps += 1
        last = {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
        echo(f"epoch {epoch + 1}/{cfg.epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()))
    after = evaluate_env_model(model, eval_rows, cfg.batch_size)
    echo(f"trained ({eval_on}): " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in after.items()))
    metrics = {"train_transitions": len(train), "eval_transitions": len(held), "train_episodes": n_ep(train),
               "eval_episodes": n_ep(held), "eval_on": eval_on, "steps": steps, "train_loss": last,
               "prompted_base": base, "trained": after, "baselines": _baselines(train, eval_rows),
               "seconds": round(time.perf_counter() - t_start, 1)}
    save_env_model(model, out_dir, metrics, openings(rows))
    echo(f"saved the environment model to {out_dir}")
    return metrics


def save_env_model(model: EnvModel, out_dir: Path | str, metrics: dict, opening_states: list[list[dict]]) -> Path:
    from safetensors.torch import save_file

    meta = {"format": FORMAT_VERSION, "config": model.cfg.model_dump(), "reward_mean": model.reward_mean,
            "reward_std": model.reward_std, "longest_observation": model.longest_observation,
            "openings": opening_states, "metrics": metrics}
    return publish_folder(out_dir, {
        WEIGHTS_FILE: lambda p: save_file({k: v.cpu().contiguous() for k, v in model.trainable_state_dict().items()}, str(p)),
        META_FILE: lambda p: p.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"),
    }, kind="env_model")


def read_env_model_meta(path: Path | str) -> tuple[Path, dict]:
    d = Path(path).expanduser()
    if d.is_file() and d.name in (WEIGHTS_FILE, META_FILE):
        d = d.parent
    if not (d / META_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise UserError(f"'{path}' is not an environment model (needs {META_FILE} and {WEIGHTS_FILE})", FIX)
    check_folder(d, "environment model", FIX)
    try:
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        meta["config"], meta["openings"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{d / META_FILE}: not a valid environment model description ({type(exc).__name__})", FIX) from None
    return d, meta


_LOADED: dict[tuple[str, str, int], EnvModel] = {}


def load_env_model(path: Path | str, device: torch.device | str | None = None, *, fresh: bool = False) -> tuple[EnvModel, dict]:
    """(model, its json) from a `train-env-model` folder; cached per folder, device and
    weights' mtime, unless `fresh` (a copy of its own, for a caller that trains it further)."""
    d, meta = read_env_model_meta(path)
    key = (str(d.resolve()), str(device), (d / WEIGHTS_FILE).stat().st_mtime_ns)
    if fresh or key not in _LOADED:
        try:
            cfg = EnvModelConfig.model_validate(meta["config"])
        except ValueError as exc:
            raise UserError(f"{d / META_FILE}: not a valid environment model description ({type(exc).__name__})", FIX) from None
        model = EnvModel.build(cfg, device=device)
        model.reward_mean, model.reward_std = float(meta.get("reward_mean", 0.0)), float(meta.get("reward_std", 1.0))
        model.longest_observation = meta.get("longest_observation")  # None in folders from before the cap: no cap
        try:
            state = load_safetensors(d / WEIGHTS_FILE)
        except DamagedFile as exc:
            raise UserError(f"environment model '{d}' is damaged: {exc.reason}", FIX) from None
        expected = set(model.trainable_state_dict())
        if set(state) != expected:
            raise UserError(f"environment model weights in '{d}' do not fit its base model '{cfg.model}'", FIX)
        model.load_state_dict(state, strict=False)
        model.eval()
        if fresh:
            return model, meta
        _LOADED[key] = model
    return _LOADED[key], meta
