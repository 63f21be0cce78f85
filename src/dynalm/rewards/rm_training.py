"""Training a reward model from JSONL: reading and checking the rows (one kind per file),
the held-out split, evaluation (MSE and Pearson r, or pairwise accuracy) and the training loop
behind `dynalm train-rm`. The model itself, its losses and its loading live in `learned`."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable

import torch

from ..data import jsonl_objects, read_text
from ..errors import UserError
from .learned import (
    PAIR_FIELDS,
    REGRESSION_FIELDS,
    RewardModel,
    RewardModelConfig,
    bradley_terry_loss,
    regression_loss,
    save_reward_model,
)


# ---------------------------------------------------------------------------- metrics
def pairwise_accuracy(r_chosen: list[float], r_rejected: list[float]) -> float:
    """Share of pairs where the chosen completion scores higher (ties count one half)."""
    if not r_chosen:
        return float("nan")
    wins = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(r_chosen, r_rejected))
    return wins / len(r_chosen)


def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation; None when either side is constant (or fewer than 2 values)."""
    n = len(x)
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)




# ---------------------------------------------------------------------------- data
def _row_kind(row: dict) -> str | None:
    if "chosen" in row or "rejected" in row:
        return "pairs"
    if "completion" in row or "reward" in row:
        return "regression"
    return None


def read_reward_rows(spec: str) -> tuple[str, list[dict]]:
    """(kind, rows) from a JSONL file; kind is 'pairs' or 'regression', set by the first row."""
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"reward data file '{spec}' not found", "check the path in `data`")
    kind: str | None = None
    first_line = 0
    rows: list[dict] = []
    for i, row in jsonl_objects(spec, read_text(spec, path)):  # the data readers' own JSONL checks
        if kind is None:
            kind = _row_kind(row)
            first_line = i
            if kind is None:
                raise UserError(
                    f"{spec}: line {i} is neither a rated completion nor a preference pair",
                    "give {prompt, completion, reward} or {prompt, chosen, rejected} rows",
                )
        _check_reward_row(spec, i, row, kind, first_line)
        rows.append(row)
    if not rows:
        raise UserError(f"reward data file '{spec}' is empty", "give at least one row")
    return kind, rows


def _check_reward_row(spec: str, line: int, row: dict, kind: str, first_line: int) -> None:
    fields = PAIR_FIELDS if kind == "pairs" else REGRESSION_FIELDS
    what = "preference pair" if kind == "pairs" else "rated completion"
    for f in fields:
        if f not in row:
            raise UserError(
                f"{spec}: line {line} has no field '{f}'",
                f"line {first_line} is a {what}, so every row needs {', '.join(fields)}",
            )
    other = set(REGRESSION_FIELDS if kind == "pairs" else PAIR_FIELDS) - {"prompt"}
    mixed = sorted(other & set(row))
    if mixed:
        raise UserError(
            f"{spec}: line {line} mixes a {what} with field '{mixed[0]}'",
            "use one kind of row per file",
        )
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        raise UserError(f"{spec}: line {line}: field 'prompt' must be a non-empty string", "fix that line")
    for f in fields[1:]:
        v = row[f]
        if f == "reward":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                raise UserError(f"{spec}: line {line}: field 'reward' must be a finite number, not {v!r}", "fix that line")
        elif not isinstance(v, str):
            raise UserError(f"{spec}: line {line}: field '{f}' must be a string", "fix that line")


def split_rows(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded shuffle, then the first round(n·fraction) rows (≥1 when > 0) held out."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(len(rows) * eval_fraction))
    held = [rows[i] for i in order[:n_eval]]
    train = [rows[i] for i in order[n_eval:]]
    return train, held


def prefix_rows(rows: list[dict], tokenizer, k: int, seed: int) -> list[dict]:
    """`k` prefixes of every rated completion, each cut after a uniformly drawn number of its
    tokens (0 = the prompt alone; never the whole completion), each with the completion's
    reward: the Monte-Carlo value target of the state the cut leaves."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        ids = tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
        for _ in range(k):
            cut = rng.randrange(len(ids)) if ids else 0
            out.append({"prompt": r["prompt"], "completion": tokenizer.decode(ids[:cut]), "reward": r["reward"]})
    return out


# ---------------------------------------------------------------------------- training
def _batch_loss(model: RewardModel, kind: str, batch: list[dict]) -> torch.Tensor:
    prompts = [r["prompt"] for r in batch]
    if kind == "pairs":
        # one forward over chosen and rejected together
        r = model.rewards(prompts + prompts, [x["chosen"] for x in batch] + [x["rejected"] for x in batch])
        return bradley_terry_loss(r[: len(batch)], r[len(batch) :])
    pred = model.rewards(prompts, [x["completion"] for x in batch])
    return regression_loss(pred, torch.tensor([float(x["reward"]) for x in batch], device=pred.device))


def evaluate_reward_model(model: RewardModel, kind: str, rows: list[dict], batch_size: int = 16) -> dict:
    """Pairs: accuracy and mean Bradley–Terry loss. Regression: Pearson r and MSE."""
    prompts = [r["prompt"] for r in rows]
    if kind == "pairs":
        rc = model.score(prompts, [r["chosen"] for r in rows], batch_size)
        rr = model.score(prompts, [r["rejected"] for r in rows], batch_size)
        loss = float(bradley_terry_loss(torch.tensor(rc), torch.tensor(rr)))
        return {"accuracy": pairwise_accuracy(rc, rr), "loss": loss}
    pred = model.score(prompts, [r["completion"] for r in rows], batch_size)
    target = [float(r["reward"]) for r in rows]
    mse = float(regression_loss(torch.tensor(pred), torch.tensor(target)))
    return {"pearson": pearson(pred, target), "mse": mse}


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    return x


def train_reward_model(cfg: RewardModelConfig, out_dir: Path | str, echo: Callable[[str], None] = print) -> dict:
    """Train a reward model on `cfg.data`, save it to `out_dir` and return its metrics.

    Metrics: `kind`, row counts, `eval_on` ('heldout', or 'train' when eval_fraction is 0),
    `before` / `after` evaluation dicts, `steps`, and `train_loss` (mean over the last epoch).
    """
    kind, rows = read_reward_rows(cfg.data)
    if cfg.prefixes and kind == "pairs":
        raise UserError(f"prefixes needs rated completions, and {cfg.data} holds preference pairs",
                        "set prefixes=0, or give {prompt, completion, reward} rows")
    train, held = split_rows(rows, cfg.eval_fraction, cfg.seed)
    if not train:
        raise UserError(
            f"{cfg.data}: {len(rows)} row(s) are too few to hold out {cfg.eval_fraction:g} of them",
            "add rows or lower eval_fraction",
        )
    eval_rows, eval_on = (held, "heldout") if held else (train, "train")
    what = "preference pairs" if kind == "pairs" else "rated completions"
    echo(f"reward model: {len(train)} training and {len(held)} held-out {what} from {cfg.data}")

    model = RewardModel.build(cfg)
    if kind == "regression":
        # Start at the mean target: Adam moves the bias only ~lr per step, so from 0 it would
        # take many steps to reach a far-off mean, and the trunk would be bent to cover it.
        with torch.no_grad():
            model.head.bias.fill_(sum(float(r["reward"]) for r in train) / len(train))
    before = evaluate_reward_model(model, kind, eval_rows, cfg.batch_size)
    echo(f"before training ({eval_on}): {_fmt(before)}")
    prefix_eval: dict = {}
    fit_rows = train
    if cfg.prefixes:
        # the held-out rows' prefixes (never trained on) measure the model as a critic
        held_prefixes = prefix_rows(eval_rows, model.tokenizer, cfg.prefixes, cfg.seed + 2)
        fit_rows = train + prefix_rows(train, model.tokenizer, cfg.prefixes, cfg.seed + 3)
        prefix_eval["before"] = evaluate_reward_model(model, kind, held_prefixes, cfg.batch_size)
        echo(f"{len(fit_rows)} training rows with {cfg.prefixes} prefixes of each; "
             f"before training, prefixes ({eval_on}): {_fmt(prefix_eval['before'])}")

    opt = torch.optim.Adam(model.trainable_parameters(), lr=cfg.learning_rate)
    order_rng = random.Random(cfg.seed + 1)
    steps = 0
    epoch_loss = float("nan")
    model.train()
    for epoch in range(cfg.epochs):
        order = list(range(len(fit_rows)))
        order_rng.shuffle(order)
        losses = []
        for i in range(0, len(order), cfg.batch_size):
            batch = [fit_rows[j] for j in order[i : i + cfg.batch_size]]
            loss = _batch_loss(model, kind, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
        epoch_loss = sum(losses) / len(losses)
        echo(f"epoch {epoch + 1}/{cfg.epochs}: train loss {epoch_loss:.4f}")
    model.eval()

    after = evaluate_reward_model(model, kind, eval_rows, cfg.batch_size)
    echo(f"after training ({eval_on}): {_fmt(after)}")
    if cfg.prefixes:
        prefix_eval["after"] = evaluate_reward_model(model, kind, held_prefixes, cfg.batch_size)
        echo(f"after training, prefixes ({eval_on}): {_fmt(prefix_eval['after'])}")
    metrics = _json_safe(
        {
            "kind": kind,
            "train_rows": len(train),
            "eval_rows": len(held),
            "eval_on": eval_on,
            "steps": steps,
            "train_loss": epoch_loss,
            "before": before,
            "after": after,
            **({"prefixes": cfg.prefixes, "prefix_rows": len(held_prefixes), "prefix_before": prefix_eval["before"],
                "prefix_after": prefix_eval["after"]} if cfg.prefixes else {}),
        }
    )
    save_reward_model(model, out_dir, metrics)
    echo(f"saved the reward model to {out_dir}")
    return metrics


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in m.items())
