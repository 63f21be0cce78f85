"""`dynalm` command line: train, generate, eval, train-rm, rollouts, train-env-model, config, runs.

A user's mistake prints one line, `dynalm: error: <what> (<how to fix>)`, and exits 2.
Under `accelerate launch` (several processes) an error every process hits alike (a config
mistake, a diverged run) is printed by rank 0 alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from .errors import UserError


PLANNERS = ["sample", "greedy", "best-of-n", "mcts", "lookahead"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own mistakes: same one-line shape, exit 2
        raise UserError(message, f"see `{self.prog} --help`")


def _add_config_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--config", "-c", required=required, help="YAML config, e.g. configs/story.yaml")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dynalm", description="Model-based RL for language models: policy + value head + LM environment.")
    from . import __version__

    ap.add_argument("--version", action="version", version=f"dynalm {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a policy (a2c, ppo, grpo, rloo, reinforce_pp)")
    _add_config_args(t)
    t.add_argument("--out", "-o", help="run directory (default runs/<task>-<algo>-<time>)")
    t.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest intact checkpoint")
    t.add_argument("--no-verify", action="store_true",
                   help="on --resume, check checkpoint file sizes only, not their SHA-256 (faster on huge runs)")

    g = sub.add_parser("generate", help="sample completions from a trained run or any model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory")
    src.add_argument("--model", help="hub id, local directory, .gguf file or 'smollm2-135m-instruct'")
    g.add_argument("--prompt", "-p", required=True, action="append", help="prompt text (repeatable)")
    g.add_argument("-n", type=int, default=1, help="completions per prompt")
    g.add_argument("--max-new-tokens", type=int, help="override generation.max_new_tokens")
    g.add_argument("--temperature", type=float, help="override generation.temperature")
    g.add_argument("--greedy", action="store_true", help="argmax decoding (same as --planner greedy)")
    g.add_argument("--planner", choices=PLANNERS, help="decoder: sample, greedy, best-of-n or mcts (default: config planner.name)")
    g.add_argument("--raw", action="store_true", help="do not apply the task template / chat template")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--json", action="store_true", help="print JSON lines")
    _add_config_args(g)

    e = sub.add_parser("eval", help="evaluate on the eval split: rewards, KL, perplexity, distinct-n")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (base vs trained; writes RUN_DIR/eval.json, or --out)")
    src.add_argument("--model", help="evaluate a model as is")
    e.add_argument("--out", help="write the JSON result (and a multi-turn eval's transcripts, as OUT.transcripts.jsonl) "
                   "here instead of into the run, whose eval, transcripts and report stay as they are")
    e.add_argument("--planner", choices=PLANNERS, help="decoder for the trained policy (base always samples); lookahead: multi-turn envs, needs planner.env_model")
    _add_config_args(e)

    r = sub.add_parser("train-rm", help="train a reward model from JSONL (regression rows or preference pairs)")
    r.add_argument("--data", "-d", required=True, help='JSONL of {"prompt","completion","reward"} or {"prompt","chosen","rejected"} rows')
    r.add_argument("--out", "-o", required=True, help="folder for reward_model.safetensors + reward_model.json")
    r.add_argument("--model", help="trunk LM (default: the embedded smollm2-135m-instruct)")
    r.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override a reward-model setting")

    ro = sub.add_parser("rollouts", help="rated completions of a policy on its training prompts: rows for train-rm")
    src = ro.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", "-c", help="YAML config: its untrained policy, prompts and reward")
    src.add_argument("--run", help="run directory: its trained policy")
    ro.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    ro.add_argument("--out", "-o", required=True, help='JSONL file of {"prompt","completion","reward"} rows')
    ro.add_argument("--prompts", type=int, default=128, help="the first N training prompts (default 128)")
    ro.add_argument("--per-prompt", type=int, default=4, help="completions per prompt (default 4)")
    ro.add_argument("--batch", type=int, default=32, help="completions sampled at once (default 32)")
    ro.add_argument("--seed", type=int, default=0)
    ro.add_argument("--force", action="store_true", help="replace --out if it exists")

    em = sub.add_parser("train-env-model", help="learn the environment: an LM trained on a run's transitions.jsonl")
    em.add_argument("--data", "-d", required=True, help="RUN/transitions.jsonl (written with env.record_transitions: true) or RUN")
    em.add_argument("--out", "-o", required=True, help="folder for env_model.safetensors + env_model.json")
    em.add_argument("--model", help="base LM (default: the embedded smollm2-135m-instruct)")
    em.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="override an environment-model setting")

    c = sub.add_parser("config", help="print the resolved config (defaults + file + --set)")
    _add_config_args(c)
    rn = sub.add_parser("runs", help="a table of runs (task, algorithm, steps, eval reward, KL, wall time, commit)")
    rn.add_argument("dirs", nargs="*", default=["runs"], metavar="DIR", help="run folders, or folders holding runs (default: runs)")
    rn.add_argument("--plot", metavar="PNG", help="also put their training-reward curves on one PNG")
    rn.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")
    return ap


# ----------------------------------------------------------------------------- commands


def cmd_train(args) -> int:
    from .config import load_config
    from .run import Stopped, train

    if args.resume and (args.config or args.set or args.out):
        raise UserError("--resume takes the config of the run it continues", "drop --config/--set/--out when resuming")
    cfg = None if args.resume else load_config(args.config, args.set)
    try:
        run_dir = train(cfg, args.out, force=args.force, resume=args.resume, echo=lambda s: print(s, flush=True), verify=not args.no_verify)
    except Stopped as s:
        return 128 + int(s.signum)
    if not _other_rank():  # launched data-parallel: rank 0 speaks for the run
        print(f"run directory: {run_dir}")
    return 0


def _model_and_cfg(args):
    from .config import load_config, parse_set
    from .models.policy import PolicyValueModel
    from .trained import load_run

    if args.run:
        over = parse_set(args.set)
        if args.config:
            from .config import deep_merge, read_yaml

            over = deep_merge(read_yaml(args.config), over)
        return load_run(args.run, over)
    cfg = load_config(args.config, list(args.set) + [f"model.name={args.model}"])
    return cfg, PolicyValueModel.build(cfg.model, value_head=False, frozen=True)


def cmd_generate(args) -> int:
    import torch

    from .envs import TextEnv
    from .planning import plan, path_reward_for

    if args.n < 1:
        raise UserError("-n must be at least 1", "pass -n 1 or more")
    cfg, model = _model_and_cfg(args)
    from pydantic import ValidationError

    from .config import GenerationConfig, format_validation_error

    upd = {k: v for k, v in {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}.items() if v is not None}
    try:  # validated like the config: --temperature 0 or --max-new-tokens -1 are user mistakes
        gen_cfg = GenerationConfig.model_validate({**cfg.generation.model_dump(), **upd})
    except ValidationError as err:
        raise format_validation_error(err, GenerationConfig) from None
    if args.raw:  # the prompt exactly as given: no task template, no chat template
        cfg = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(update={"template": "{prompt}"}),
                "model": cfg.model.model_copy(update={"use_chat_template": False}),
            }
        )
    pcfg = cfg.planner.model_copy(update={"name": "greedy" if args.greedy else (args.planner or cfg.planner.name)})
    env = TextEnv(cfg, model.tokenizer)  # resolving rewards is cheap; models load on first call
    rows = [{cfg.data.prompt_field: p} for p in args.prompt for _ in range(args.n)]
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    res = plan(model, env, rows, gen_cfg, pcfg, max_prompt_tokens=cfg.model.max_prompt_tokens, generator=gen,
               path_reward=path_reward_for(cfg, model))
    for r, c in zip(rows, res.completions):
        p = r[cfg.data.prompt_field]
        if args.json:
            print(json.dumps({"prompt": p, "completion": c, "planner": pcfg.name}, ensure_ascii=False))
        else:
            print(f"### {p}\n{c}\n")
    return 0


@contextlib.contextmanager
def _eval_progress(cfg, rows: list, *, sides: int, planner: str):
    """A progress bar on stderr for text evals (mcts takes seconds per completion); yields advance(k)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .evaluate import limit_rows

    n = len(limit_rows(rows, cfg.eval)) * cfg.eval.samples_per_prompt * sides
    show = cfg.log.progress and cfg.env.kind == "text"
    with Progress(
        TextColumn(f"eval ({planner})"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=Console(stderr=True), disable=not show, transient=True,
    ) as bar:
        task = bar.add_task("eval", total=n)
        yield lambda k: bar.advance(task, k)


def cmd_eval(args) -> int:
    from .checkpoint import write_text_atomic
    from .evaluate import evaluate, summary_table
    from .evaluate_episodes import write_transcripts
    from .report import finalize_report
    from .rundir import publish_eval
    from .run import eval_rows

    if args.out and Path(args.out).is_dir():
        raise UserError(f"--out '{args.out}' is a folder", "give a file name, e.g. eval.json")
    cfg, model = _model_and_cfg(args)
    rows = eval_rows(cfg)
    if rows is None:
        raise UserError("no eval data: data.eval is empty", "set data.eval in the config or with --set")
    planner = args.planner or cfg.planner.name
    base = bool(args.run) and planner == "sample"  # base vs trained; other planners: the trained side alone
    with _eval_progress(cfg, rows, sides=2 if base else 1, planner=planner) as advance:
        result = evaluate(model, rows, cfg, base=base, trained=True, planner=planner, progress=advance)
    if not args.run:  # a bare model: one side, decoded with the planner
        result["model"] = result.pop("trained")
    transcripts = cfg.env.kind != "text" and cfg.env.transcripts  # the conversations behind the numbers
    # with --out the result goes there alone: an eval under other settings (--set env.kind=model, other
    # rewards) must not replace the run's own eval, transcripts or report
    if args.run and not args.out:
        name = "eval.json" if planner == "sample" else f"eval-{planner}.json"
        write_text_atomic(Path(args.run) / name, json.dumps(result, indent=2, ensure_ascii=False))
        if transcripts:
            tname = "transcripts.jsonl" if planner == "sample" else f"transcripts-{planner}.jsonl"
            write_transcripts(Path(args.run) / tname, result, cfg.env.transcripts)
        main_eval = Path(args.run) / "eval.json"
        main_result = json.loads(main_eval.read_text()) if main_eval.is_file() else None
        finalize_report(Path(args.run), main_result, model, cfg, rows, echo=lambda s: print(s, file=sys.stderr))
        publish_eval(Path(args.run), cfg, main_result)  # the run's trackers get the new planner table and report
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(args.out), json.dumps(result, indent=2, ensure_ascii=False))
        if transcripts:
            write_transcripts(Path(args.out).with_suffix(".transcripts.jsonl"), result, cfg.env.transcripts)
    print(summary_table(result))
    return 0


def cmd_train_rm(args) -> int:
    from pydantic import ValidationError

    from .config import format_validation_error, parse_set
    from .rewards.learned import RewardModelConfig
    from .rewards.rm_training import train_reward_model

    raw = {"data": args.data, **parse_set(args.set)}
    if args.model:
        raw["model"] = args.model
    try:
        cfg = RewardModelConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, RewardModelConfig) from None
    metrics = train_reward_model(cfg, Path(args.out), echo=lambda s: print(s, flush=True))
    before, after = metrics["before"], metrics["after"]
    key = "accuracy" if metrics["kind"] == "pairs" else "pearson"
    print(f"held-out {key}: {before.get(key)} before → {after.get(key)} after training")
    if "prefix_after" in metrics:
        print(f"held-out prefixes (as a critic): pearson {metrics['prefix_before'].get('pearson')} before → "
              f"{metrics['prefix_after'].get('pearson')} after training")
    print(f"reward model: {args.out} (use it as a reward: name: rm:{args.out})")
    return 0


def cmd_rollouts(args) -> int:
    from .config import load_config, parse_set
    from .models.policy import PolicyValueModel
    from .rl.trainer import seed_everything
    from .rollouts import check_counts, check_out, rated_rows, write_rollouts
    from .run import set_threads, train_rows
    from .trained import load_run

    out = Path(args.out)
    check_out(out, args.force)
    if args.prompts < 1:
        raise UserError("--prompts must be at least 1", "pass 1 or more")
    check_counts(args.per_prompt, args.batch)  # before any model loads
    if args.run:
        cfg, model = load_run(args.run, parse_set(args.set))
        rows = train_rows(cfg)[: args.prompts]
    else:
        cfg = load_config(args.config, args.set)
        rows = train_rows(cfg)[: args.prompts]
        rated_rows(cfg, rows)  # refused before the model loads
        seed_everything(cfg.seed)  # the untrained policy a run of this config starts from (its LoRA init)
        model = PolicyValueModel.from_config(cfg)
    set_threads(cfg)
    res = write_rollouts(cfg, model, rows, out, per_prompt=args.per_prompt, batch=args.batch, seed=args.seed,
                         echo=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"wrote {res['rows']} rated completions to {out} (reward mean {res['reward_mean']:.4f}, std {res['reward_std']:.4f})")
    print(f"next: dynalm train-rm --data {out} --out RM --set prefixes=4, then train with "
          "--set model.critic=model --set model.critic_init=RM")
    return 0


def cmd_train_env_model(args) -> int:
    from pydantic import ValidationError

    from .config import format_validation_error, parse_set
    from .envmodel import EnvModelConfig, train_env_model

    if Path(args.out).is_file():
        raise UserError(f"--out '{args.out}' is a file", "give a folder for the environment model")
    raw = {"data": args.data, **parse_set(args.set)}
    if args.model:
        raw["model"] = args.model
    try:
        cfg = EnvModelConfig.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err, EnvModelConfig) from None
    m = train_env_model(cfg, Path(args.out), echo=lambda s: print(s, flush=True))
    b, t = m["prompted_base"], m["trained"]
    if t["nll_per_token"] is not None:
        print(f"held-out next-observation NLL: {b['nll_per_token']:.4f}/token prompted → {t['nll_per_token']:.4f}/token trained")
    print(f"environment model: {args.out} (use it as an environment: --set env.kind=model --set env.path={args.out})")
    return 0


def cmd_config(args) -> int:
    from .config import dump_config, load_config

    print(dump_config(load_config(args.config, args.set)), end="")
    return 0


def _quiet_libraries() -> None:
    """Our own progress bar and errors are the interface; silence the libraries' bars and warnings."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass


def _other_rank() -> bool:
    """A process other than rank 0 of a launch (`accelerate launch`, torchrun set RANK)."""
    return os.environ.get("RANK", "0").strip() not in ("", "0")


def cmd_runs(args) -> int:
    from .runs import COLUMNS, find_runs, plot, summary, table_rows

    rows = [summary(p) for p in find_runs(args.dirs)]
    if args.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "curve"}, ensure_ascii=False))
    else:
        from rich.console import Console
        from rich.table import Table

        t = Table(*COLUMNS)
        for r in table_rows(rows):
            t.add_row(*r)
        Console(width=200).print(t)
    if args.plot:
        out = Path(args.plot)
        if out.is_dir():
            raise UserError(f"--plot '{out}' is a folder", "give a file name, e.g. runs.png")
        plot(rows, out)
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.cmd != "train" and os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
            err = UserError(f"only `dynalm train` runs data-parallel, not `dynalm {args.cmd}`", "run it without accelerate launch")
            err.all_ranks = True
            raise err
        return {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "train-rm": cmd_train_rm, "rollouts": cmd_rollouts,
                "train-env-model": cmd_train_env_model,
                "config": cmd_config,
                "runs": cmd_runs}[args.cmd](args)
    except UserError as err:
        if not (getattr(err, "all_ranks", False) and _other_rank()):
            print(f"dynalm: error: {err.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dynalm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
