"""A training run on disk: config, metrics, samples, checkpoints, export, eval, report.

RUN_DIR/
  config.yaml      the resolved config
  metrics.jsonl    one JSON object per step, each with its `step`
  samples.jsonl    prompt, completion and each reward term, every `log.samples_every` steps
  tb/              TensorBoard events
  checkpoints/     atomic checkpoints + `latest`
  export/          the trained model (LoRA merged) + value_head.safetensors, for transformers
  eval.json        base vs trained on the eval split
  report.md        curves.png, eval table, samples before/after
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_text_atomic
from .config import Config, build_config, dump_config, read_yaml
from .data import read_rows
from .errors import UserError
from .evaluate import evaluate
from .models.policy import PolicyValueModel
from .envs import TextEnv
from .report import write_report
from .rewards import RewardSet
from .rl.trainer import Trainer, seed_everything

RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints")


class Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.task}-{cfg.algorithm.name}-{stamp}"


def train_rows(cfg: Config) -> list[dict]:
    d = cfg.data
    if d.prompts is not None:
        return [{d.prompt_field: p} for p in d.prompts]
    if d.train is None:
        raise UserError("no training data: data.train and data.prompts are both empty", "set data.train or data.prompts")
    return read_rows(d.train, d.prompt_field)


def eval_rows(cfg: Config) -> list[dict] | None:
    return read_rows(cfg.data.eval, cfg.data.prompt_field) if cfg.data.eval else None


def set_threads(cfg: Config) -> None:
    n = cfg.train.threads or os.cpu_count() or 1
    torch.set_num_threads(n)


def prepare_run_dir(out: Path, *, force: bool) -> None:
    if out.exists() and any((out / m).exists() for m in RUN_MARKERS):
        if not force:
            raise UserError(
                f"'{out}' already holds a run", "pick another --out, resume it with --resume, or pass --force to overwrite"
            )
        for m in RUN_MARKERS + ("samples.jsonl", "tb", "export", "eval.json", "report.md", "curves.png"):
            p = out / m
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _truncate_jsonl(path: Path, max_step: int) -> None:
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= max_step]
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


class _Logger:
    def __init__(self, run_dir: Path, cfg: Config):
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.samples = open(run_dir / "samples.jsonl", "a", encoding="utf-8")
        self.tb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:
                self.tb = None

    def log(self, m: dict) -> None:
        self.metrics.write(json.dumps(m) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in m.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, m["step"])

    def log_samples(self, step: int, batch) -> None:
        for i in range(len(batch)):
            rec = {
                "step": step,
                "prompt": batch.prompts[i],
                "completion": batch.completions[i],
                "reward": float(batch.scores[i]),
                **{k: float(v[i]) for k, v in batch.reward_terms.items()},
            }
            self.samples.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.samples.flush()

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()


def _progress(cfg: Config, total: int, start: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("reward {task.fields[reward]}  KL {task.fields[kl]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not cfg.log.progress,
        transient=False,
    )


def _checkpoint(trainer: Trainer, run_dir: Path) -> Path:
    cfg = trainer.cfg
    return save_checkpoint(
        run_dir / "checkpoints",
        trainer.step_idx,
        trainer.model.trainable_state_dict(),
        trainer.state_dict(),
        cfg.log.keep_checkpoints,
    )


def train(cfg: Config, out: str | Path | None = None, *, force: bool = False, resume: str | Path | None = None, echo=print) -> Path:
    """Train per `cfg` into a run directory (or continue the run in `resume`); returns the run directory."""
    if resume is not None:
        run_dir = Path(resume)
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)", "pass the folder printed by `dynalm train`")
        cfg = build_config(read_yaml(run_dir / "config.yaml"))
        ckpt = latest_checkpoint(run_dir / "checkpoints")
    else:
        run_dir = Path(out) if out else default_run_dir(cfg)
        # validate data and rewards before touching the disk
        train_rows(cfg)
        if cfg.eval.enabled:
            eval_rows(cfg)
        RewardSet(cfg.rewards)
        prepare_run_dir(run_dir, force=force)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        ckpt = None
    rows = train_rows(cfg)
    ev = eval_rows(cfg) if cfg.eval.enabled else None
    rewards = RewardSet(cfg.rewards)
    set_threads(cfg)
    seed_everything(cfg.seed)
    model = PolicyValueModel.from_config(cfg)
    trainer = Trainer(cfg, model, rows, TextEnv(cfg, model.tokenizer, rewards))
    if ckpt is not None:
        weights, state = load_checkpoint(ckpt, map_location=model.device)
        model.load_trainable_state_dict(weights)
        trainer.load_state_dict(state)
        echo(f"resuming {run_dir} from {ckpt.name} (step {trainer.step_idx})")
    elif resume is not None:
        echo(f"no checkpoint in {run_dir}; starting it from step 0")
    _truncate_jsonl(run_dir / "metrics.jsonl", trainer.step_idx)
    _truncate_jsonl(run_dir / "samples.jsonl", trainer.step_idx)

    stop = {"sig": None}

    def _on_signal(signum, _frame):
        if stop["sig"] is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["sig"] = signum

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    logger = _Logger(run_dir, cfg)
    total = cfg.train.steps
    try:
        with _progress(cfg, total, trainer.step_idx) as prog:
            task = prog.add_task("train", total=total, completed=trainer.step_idx, reward="-", kl="-")
            while trainer.step_idx < total:
                res = trainer.step()
                m = res.metrics
                logger.log(m)
                step = m["step"]
                if step % cfg.log.samples_every == 0 or step == 1:
                    logger.log_samples(step, res.batch)
                if cfg.log.print_episodes:
                    ret = res.batch.rewards.sum(-1).tolist()
                    for i, r in enumerate(ret):
                        prog.console.print(f"Episode {(step - 1) * len(ret) + i + 1}: Cumulative Reward = {r:.4f}")
                prog.update(task, completed=step, reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.3f}")
                if not sys.stderr.isatty() and not cfg.log.print_episodes and cfg.log.progress:
                    prog.console.print(
                        f"step {step}/{total} reward {m['reward']:.4f} kl {m['kl']:.4f} ({m['time/step']:.1f}s)"
                    )
                if step % cfg.log.checkpoint_every == 0 and step < total:
                    _checkpoint(trainer, run_dir)
                if stop["sig"] is not None:
                    raise Stopped(stop["sig"])
    except Stopped as s:
        path = _checkpoint(trainer, run_dir)
        logger.close()
        echo(f"stopped at step {trainer.step_idx}; checkpoint {path}")
        echo(f"resume with: dynalm train --resume {run_dir}")
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    logger.close()
    _checkpoint(trainer, run_dir)
    export_model(model, run_dir / "export")
    result = None
    if ev is not None:
        result = evaluate(model, ev, cfg)
        write_text_atomic(run_dir / "eval.json", json.dumps(result, indent=2, ensure_ascii=False))
        echo(
            f"eval reward: base {result['base']['reward']:.4f} → trained {result['trained']['reward']:.4f} "
            f"({result['delta_reward']:+.4f}) on {result['n_prompts']} held-out prompts"
        )
    write_report(run_dir, result)
    return run_dir


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def export_model(model: PolicyValueModel, out: Path) -> None:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.export(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def load_run(run_dir: str | Path, cfg_overrides: dict | None = None) -> tuple[Config, PolicyValueModel]:
    """The run's config and its policy with the latest trained weights."""
    from .config import deep_merge

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)", "pass the folder printed by `dynalm train`")
    cfg = build_config(deep_merge(read_yaml(run_dir / "config.yaml"), cfg_overrides or {}))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise UserError(f"run '{run_dir}' has no checkpoint yet", "train it first or resume it")
    model = PolicyValueModel.from_config(cfg)
    weights, _ = load_checkpoint(ckpt, map_location=model.device)
    model.load_trainable_state_dict(weights)
    model.eval()
    return cfg, model
