"""A training run on disk: config, metrics, samples, checkpoints, export, eval, report.

RUN_DIR/
  config.yaml      the resolved config
  metrics.jsonl    one JSON object per step, each with its `step`
  samples.jsonl    prompt, completion and each reward term, every `log.samples_every` steps
  tb/              TensorBoard events
  checkpoints/     atomic checkpoints + `latest`
  export/          the trained model (LoRA merged) + value_head.safetensors, for transformers
  env_model/       with dyna.env_model: the environment model as learned (a `train-env-model` folder)
  eval.json        base vs trained on the eval split
  report.md        curves.png, eval table, samples before/after

Faults. A folder is a run when it holds config.yaml, which `train` writes (atomically)
only after the data, rewards, model and memory estimate have been checked, and before
anything else of the run. A kill before that leaves at most an empty folder, which a fresh
`train --out` of the same folder uses as is. A kill after it (even kill -9, even during a
checkpoint write) is undone by `train --resume`: it restarts from the latest complete
checkpoint, drops the metrics/samples lines written after it (and a half-written last
line), and, being deterministic, rewrites them identically. SIGINT/SIGTERM stop at the end
of the current step with a checkpoint (exit 130/143 from the CLI).

Data-parallel (`accelerate launch -m dynalm train ...`, distributed.py): every process
checks the inputs, loads the model and trains its share of each step; rank 0 alone writes
the run directory (config, metrics, samples, tb, checkpoints, export, eval, report). The
others stop after the last checkpoint. A signal stops every process at the same step.
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

from .checkpoint import (
    clean_partial_checkpoints,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    write_text_atomic,
)
from .config import Config, build_config, dump_config
from .data import read_rows
from .distributed import Dist, check_world
from .errors import UserError
from .integrity import DamagedFile, read_manifest, write_guard, write_manifest
from .evaluate import evaluate
from .models.policy import PolicyValueModel, pick_device
from .envs import make_env
from . import transitions
from .memory import check_memory, estimate_memory, model_memory_estimate, set_mmap_threshold  # noqa: F401 (re-exported for tests)
from .report import finalize_report
from .trackers import check_trackers
from .rundir import (  # noqa: F401 (some re-exported)
    _Logger, _truncate_jsonl, check_run_dir, config_sha256, default_run_dir, prepare_run_dir,
    read_run_config, source_commit,
)
from .rewards import RewardSet
from .rl.trainer import NonFiniteError, Trainer, seed_everything
from .trained import load_weights

class Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def train_rows(cfg: Config) -> list[dict]:
    d = cfg.data
    if d.prompts is not None:
        return [{d.prompt_field: p} for p in d.prompts]
    if d.train is None and cfg.env.kind in ("custom", "model"):  # a game needs no data: episodes by seed
        from .envs.custom import train_seed_rows

        return train_seed_rows(cfg)
    if d.train is None:
        raise UserError("no training data: data.train and data.prompts are both empty", "set data.train or data.prompts")
    return _with_reference(read_rows(d.train, d.prompt_field, d.train_split), cfg)


def eval_rows(cfg: Config) -> list[dict] | None:
    d = cfg.data
    if not d.eval and cfg.env.kind in ("custom", "model"):
        from .envs.custom import eval_seed_rows

        return list(eval_seed_rows(cfg))
    return _with_reference(read_rows(d.eval, d.prompt_field, d.eval_split), cfg) if d.eval else None


def _with_reference(rows: list[dict], cfg: Config) -> list[dict]:
    """Expose `data.reference_field` to reward functions under the name `reference`."""
    f = cfg.data.reference_field
    if not f or f == "reference":
        return rows
    missing = next((i for i, r in enumerate(rows, start=1) if f not in r), None)
    if missing is not None:
        raise UserError(f"row {missing} has no field '{f}' (data.reference_field)", "fix the data or data.reference_field")
    return [{**r, "reference": r[f]} for r in rows]


def set_threads(cfg: Config, dist: Dist | None = None) -> None:
    """train.threads, else all cores (shared among this machine's processes when data-parallel)."""
    n = cfg.train.threads or os.cpu_count() or 1
    if dist is not None and not cfg.train.threads:
        n = max(1, n // dist.local_world_size)
    torch.set_num_threads(n)


def _progress(cfg: Config, total: int, start: int, show: bool = True):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("reward {task.fields[reward]}  KL {task.fields[kl]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not (cfg.log.progress and show),
        transient=False,
    )


def _checkpoint(trainer: Trainer, run_dir: Path) -> Path:
    """Save the trainer's state; data-parallel: every process calls it, rank 0 writes."""
    cfg = trainer.cfg
    state = trainer.state_dict()  # a collective when data-parallel (gathers each process's generator)
    if trainer.dist is not None and not trainer.dist.is_main:
        return run_dir / "checkpoints" / f"step-{trainer.step_idx:06d}"
    return save_checkpoint(
        run_dir / "checkpoints",
        trainer.step_idx,
        trainer.model.trainable_state_dict(),
        state,
        cfg.log.keep_checkpoints,
        meta={"config_sha256": config_sha256(cfg), "commit": source_commit()},
    )


# ----------------------------------------------------------------------------- train


def train(
    cfg: Config, out: str | Path | None = None, *, force: bool = False, resume: str | Path | None = None, echo=print,
    verify: bool = True,
) -> Path:
    """Train per `cfg` into a run directory (or continue the run in `resume`); returns the run directory.

    Resuming verifies the checkpoint against its manifest (sizes, and SHA-256 unless
    `verify=False`) and falls back to the newest intact one (checkpoint.resume_point).

    Launched with several processes (WORLD_SIZE > 1), it trains data-parallel: see distributed.py.
    """
    try:
        if resume is not None:
            run_dir = Path(resume)
            if not (run_dir / "config.yaml").is_file():
                raise UserError(f"'{run_dir}' is not a run directory (no config.yaml)", "pass the folder printed by `dynalm train`")
            cfg = build_config(read_run_config(run_dir))
        else:
            run_dir = Path(out) if out else default_run_dir(cfg)
            check_run_dir(run_dir, force=force)
        dist = Dist.from_env(cpu=pick_device(cfg.model.device).type == "cpu")
    except UserError as err:
        err.all_ranks = True  # the same inputs on every process: rank 0 alone prints it
        raise
    if dist is None:
        return _train(cfg, run_dir, force=force, resume=resume, echo=echo, dist=None, verify=verify)
    try:
        return _train(cfg, run_dir, force=force, resume=resume, echo=echo if dist.is_main else (lambda s: None), dist=dist, verify=verify)
    finally:
        dist.close()


def _train(cfg: Config, run_dir: Path, *, force: bool, resume, echo, dist: Dist | None, verify: bool = True) -> Path:
    main = dist is None or dist.is_main
    try:
        if dist is not None:
            check_world(cfg, dist.world_size)
            run_dir = Path(dist.broadcast(str(run_dir)))  # a default name holds the time: take rank 0's
            _check_mixed_precision(echo)
        # Check everything the user gave (trackers, data, rewards, model, memory) before touching the disk.
        check_trackers(cfg.log.trackers)
        rows = train_rows(cfg)
        ev = eval_rows(cfg) if cfg.eval.enabled else None
        rewards = RewardSet(cfg.rewards)
        set_threads(cfg, dist)
        set_mmap_threshold(cfg.train.malloc_mmap_threshold_kb)
        seed_everything(cfg.seed)
        model = PolicyValueModel.from_config(cfg, device=dist.device if dist is not None else None)
        memory_line = check_memory(model, cfg, dist.world_size if dist is not None else 1)
    except UserError as err:
        err.all_ranks = True
        raise
    if dist is not None:
        dist.barrier()  # every process has checked --out before rank 0 writes into it
    if resume is None and main:
        prepare_run_dir(run_dir, force=force)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
    trainer = Trainer(cfg, model, rows, make_env(cfg, model, rewards), dist=dist)
    ckpt = None
    if resume is not None:
        found, failed = None, None
        if main:
            clean_partial_checkpoints(run_dir / "checkpoints")
            try:  # the newest checkpoint that passes its manifest and loads; damaged ones are named
                found = resume_point(run_dir / "checkpoints", verify=verify, map_location=model.device, warn=echo, set_aside=True)
            except UserError as err:
                failed = err
            ckpt = found[0] if found is not None else None
        if dist is not None:  # every process loads the checkpoint rank 0 picked (or stops with it)
            ckpt, why = dist.broadcast((ckpt, (failed.what, failed.fix) if failed is not None else None))
            if why is not None and failed is None:
                failed = UserError(*why)
        if failed is not None:
            failed.all_ranks = dist is not None
            raise failed
        if ckpt is not None:
            if found is not None:
                weights, state = found[1], found[2]
            else:
                try:
                    weights, state = load_checkpoint(ckpt, map_location=model.device, verify=False)
                except DamagedFile as exc:
                    raise UserError(f"checkpoint {ckpt} could not be read on this process ({exc.reason})", "resume again") from None
            load_weights(model, weights, ckpt)
            trainer.load_state_dict(state)
            echo(f"resuming {run_dir} from {ckpt.name} (step {trainer.step_idx})")
            man = read_manifest(ckpt) if main else None
            if man is not None and man.get("config_sha256") not in (None, config_sha256(cfg)):
                echo(f"note: {run_dir / 'config.yaml'} differs from the config {ckpt.name} was trained with; the run follows the file")
        else:
            echo(f"no checkpoint in {run_dir}; starting it from step 0")
    if dist is not None:
        echo(f"data-parallel: {dist.world_size} processes on {dist.device.type}, {cfg.train.batch_size // dist.world_size} completions each per step")
    echo(memory_line)
    if main:
        _truncate_jsonl(run_dir / "metrics.jsonl", trainer.step_idx)
        _truncate_jsonl(run_dir / "samples.jsonl", trainer.step_idx)
        _truncate_jsonl(run_dir / transitions.FILE, trainer.step_idx)
    last_ckpt = ckpt

    stop = {"sig": None}

    def _on_signal(signum, _frame):
        if stop["sig"] is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        stop["sig"] = signum  # acted on at the end of the current step, a safe point

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    logger = _Logger(run_dir, cfg) if main else None
    total = cfg.train.steps
    warned_truncation = False
    try:
        with _progress(cfg, total, trainer.step_idx, show=main) as prog:
            task = prog.add_task("train", total=total, completed=trainer.step_idx, reward="-", kl="-")
            while trainer.step_idx < total:
                try:
                    res = trainer.step()
                except NonFiniteError as err:
                    raise _nonfinite_stop(err, last_ckpt, run_dir, dist) from None
                m = res.metrics
                step = m["step"]
                if main:
                    # data-parallel: rank 0 evaluates alone; the others wait in the next step's collectives
                    if ev is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < total:
                        m.update(periodic_eval(model, ev, cfg))
                    logged = res.rows if res.rows is not None else res.batch
                    logger.log(m)
                    if step % cfg.log.samples_every == 0 or step == 1:
                        logger.log_samples(step, logged)
                    if cfg.env.record_transitions:
                        transitions.record(run_dir / transitions.FILE, model.tokenizer, step, "train", transitions.batch_transcripts(res.batch))
                    if trainer.truncated_prompts and not warned_truncation:
                        warned_truncation = True  # once per run: the count keeps growing, the advice does not change
                        echo(
                            f"warning: prompts longer than model.max_prompt_tokens={cfg.model.max_prompt_tokens} are cut "
                            f"from the left ({trainer.truncated_prompts} so far, at step {step}); raise it to keep them whole"
                        )
                    if cfg.log.print_episodes:
                        ret = res.rows.episode_returns if res.rows is not None else res.batch.rewards.sum(-1).tolist()
                        for i, r in enumerate(ret):
                            prog.console.print(f"Episode {(step - 1) * len(ret) + i + 1}: Cumulative Reward = {r:.4f}")
                    prog.update(task, completed=step, reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.3f}")
                    if not sys.stderr.isatty() and not cfg.log.print_episodes and cfg.log.progress:
                        prog.console.print(
                            f"step {step}/{total} reward {m['reward']:.4f} kl {m['kl']:.4f} ({m['time/step']:.1f}s)"
                        )
                if step % cfg.log.checkpoint_every == 0 and step < total:
                    last_ckpt = _checkpoint(trainer, run_dir)
                sig = stop["sig"]
                if dist is not None:  # stop every process at the same step, whichever got the signal
                    sig = next((s for s in dist.gather(sig) if s is not None), None)
                if sig is not None:
                    raise Stopped(sig)
    except BaseException as exc:
        if logger is not None:
            logger.close(failed=True)  # the trackers' runs end marked failed; a resume continues them
        if isinstance(exc, Stopped):
            if last_ckpt is None or last_ckpt.name != f"step-{trainer.step_idx:06d}":
                last_ckpt = _checkpoint(trainer, run_dir)
            echo(f"stopped at step {trainer.step_idx}; checkpoint {last_ckpt}")
            echo(f"resume with: dynalm train --resume {run_dir}")
        raise
    finally:
        if logger is not None:
            logger.close()
        for s, h in old.items():
            signal.signal(s, h)
    _checkpoint(trainer, run_dir)
    model.trained_beta = trainer.kl_ctl.value
    if not main:  # rank 0 alone exports, evaluates and writes the report
        return run_dir
    fix = f"free space on that disk or fix its permissions; the checkpoints are intact: dynalm train --resume {run_dir}"
    with write_guard(run_dir / "export", "the export", fix):
        export_model(model, run_dir / "export")
    if trainer.env_dyna is not None:  # the environment model Dyna learned: plan or train with it later
        with write_guard(run_dir / "env_model", "the environment model", fix):
            trainer.env_dyna.save(run_dir / "env_model")
    result = None
    if ev is not None:
        result = evaluate(model, ev, cfg)
        with write_guard(run_dir / "eval.json", "the eval result", fix):
            write_text_atomic(run_dir / "eval.json", json.dumps(result, indent=2, ensure_ascii=False))
            if cfg.env.kind != "text" and cfg.env.transcripts:  # a few eval conversations, turn by turn
                from .evaluate_episodes import write_transcripts

                write_transcripts(run_dir / "transcripts.jsonl", result, cfg.env.transcripts)
        if cfg.env.record_transitions:
            for side in ("base", "trained"):
                eps = transitions.eval_transcripts(result[side])
                transitions.record(run_dir / transitions.FILE, model.tokenizer, trainer.step_idx, f"eval-{side}", eps)
        echo(
            f"eval reward: base {result['base']['reward']:.4f} → trained {result['trained']['reward']:.4f} "
            f"({result['delta_reward']:+.4f}) on {result['n_prompts']} held-out prompts"
        )
    with write_guard(run_dir / "report.md", "the report", fix):
        finalize_report(run_dir, result, model, cfg, ev, echo=echo)
    logger.finish(result, trainer.step_idx)
    return run_dir


def _nonfinite_stop(err: NonFiniteError, last_ckpt, run_dir: Path, dist: Dist | None) -> NonFiniteError:
    out = NonFiniteError(
        f"{err.what}; last good checkpoint: {last_ckpt or 'no checkpoint yet'}",
        f"{err.fix} in {run_dir / 'config.yaml'}, then: dynalm train --resume {run_dir}",
    )
    out.all_ranks = dist is not None  # data-parallel: raised by every process at the same step
    return out


def _check_mixed_precision(echo) -> None:
    """Accelerate's mixed_precision setting is not ours: say what dynalm does instead."""
    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mp not in ("no", "bf16"):
        echo(
            f"note: accelerate mixed_precision={mp} is ignored; dynalm keeps float32 weights and autocasts "
            "forward passes to bfloat16 on CUDA (float32 on CPU)"
        )


def periodic_eval(model: PolicyValueModel, rows: list[dict], cfg: Config) -> dict:
    """The policy alone on the eval split (the run's planner, same seed every time), as
    `eval/*` metrics for the step's metrics.jsonl line. Uses the true reward, never Dyna's model."""
    t0 = time.perf_counter()
    side = evaluate(model, rows, cfg, base=False)["trained"]
    model.train()
    skip = ("seconds_per_sample", "forward_calls", "n")  # timing and counts: time/eval says it
    out = {f"eval/{k}": v for k, v in side.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}
    out["time/eval"] = time.perf_counter() - t0
    return out


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def export_model(model: PolicyValueModel, out: Path) -> None:
    """Write the export to a temporary folder with its manifest, then swap it in: a failed
    write leaves the previous export (if any) in place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.export(tmp)
        write_manifest(tmp, kind="export")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
