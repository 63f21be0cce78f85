"""Learn the environment from a run's transitions and measure the model on held-out episodes.

    python benchmarks/env_model.py [--config configs/dialog.yaml] [--steps 12] [--set KEY=VALUE ...] [--run DIR] [--em-set KEY=VALUE ...]

1. Records: trains the preset for `--steps` steps with `env.record_transitions: true` (or
   reuses `--run DIR`, which has a transitions.jsonl), so training and eval episodes of the
   real environment are on disk.
2. Learns: `dynalm train-env-model --data RUN --out RUN-em` (the embedded model with its
   own LoRA adapter; whole episodes held out).
3. Measures: the held-out next-observation NLL per token of the trained model against the
   same base model prompted as the simulator (same prompt, adapter off); the reward head's
   Pearson r and MAE against predicting the training mean; termination accuracy against
   the majority class.
4. Shows an imagined episode beside a real one: the run's base policy evaluated inside the
   learned model (`dynalm eval --model … --set env.kind=model`), first eval episode of each.

Writes benchmarks/results/env_model-NAME.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


def dynalm(*args: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dynalm", *args], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def simulator_nll(run: Path, em: Path) -> dict | None:
    """The held-out user replies' NLL per token under the dialog's real simulator: the base
    model prompted with the row's persona and goal (envs/dialog.py's user prompt), which the
    environment model never sees. None for a run that is not a dialog."""
    import torch

    from dynalm.config import build_config
    from dynalm.data import read_rows
    from dynalm.envmodel import load_env_model
    from dynalm.envmodel.data import read_transitions, split_by_episode
    from dynalm.envs.dialog import DialogEnv, DialogState
    from dynalm.rundir import read_run_config

    cfg = build_config(read_run_config(run))
    if cfg.env.kind != "dialog":
        return None
    model, meta = load_env_model(em)
    emc = model.cfg
    _, held = split_by_episode(read_transitions(str(run)), emc.eval_fraction, emc.seed)
    pf = cfg.data.prompt_field
    by_opening = {str(r[pf]): r for spec in (cfg.data.train, cfg.data.eval) for r in read_rows(spec, pf)}
    env = DialogEnv(cfg, tokenizer=model.tokenizer)
    tok, nll, n, missing = model.tokenizer, 0.0, 0, 0
    with torch.no_grad(), model.lm.reference() as lm:
        for t in held:
            row = by_opening.get(t["state"][0]["content"])
            if row is None or not t["next_observation"]:
                missing += row is None
                continue
            prompt = env.user_prompt(DialogState(row, t["state"]), t["action"], tok)
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            y = model.target_ids(t["next_observation"])
            ids = torch.tensor([p + y])
            logp = torch.log_softmax(lm(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
            nll -= float(logp.gather(-1, ids[0, len(p) :, None]).sum())
            n += len(y)
    return {"nll_per_token": nll / n if n else None, "observation_tokens": n, "unmatched_transitions": missing}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/dialog.yaml")
    ap.add_argument("--steps", type=int, default=12, help="training steps of the recording run")
    ap.add_argument("--run", help="reuse this run's transitions.jsonl instead of recording")
    ap.add_argument("--em-set", action="append", default=[], metavar="KEY=VALUE", help="train-env-model --set")
    ap.add_argument("--em", help="reuse this environment model (a train-env-model folder of the run) instead of training one")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="dynalm train --set for the recording run")
    ap.add_argument("--name", help="result name (default: the config's stem)")
    args = ap.parse_args()
    name = args.name or Path(args.config).stem
    out: dict = {"machine": machine(), "config": args.config}
    run = Path(args.run) if args.run else Path("runs") / f"envmodel-{name}"
    if not args.run:
        out["record_seconds"] = round(dynalm("train", "-c", args.config, "--out", str(run), "--force", "--set", f"train.steps={args.steps}",
                                              "--set", "env.record_transitions=true", "--set", "log.progress=false",
                                              *[a for kv in args.sets for a in ("--set", kv)]), 1)
        out["record_sets"] = args.sets
    lines = (run / "transitions.jsonl").read_text().splitlines()
    out["transitions"] = len(lines)
    out["sources"] = {}
    for x in lines:
        s = json.loads(x)["source"]
        out["sources"][s] = out["sources"].get(s, 0) + 1
    em = Path(args.em) if args.em else Path(str(run) + "-em")
    sets = [a for kv in args.em_set for a in ("--set", kv)]
    if not args.em:
        out["train_env_model_seconds"] = round(dynalm("train-env-model", "--data", str(run), "--out", str(em), *sets), 1)
    meta = json.loads((em / "env_model.json").read_text())
    out["env_model"] = meta["metrics"]
    out["env_model_config"] = meta["config"]
    # an imagined episode: the base policy inside the learned model, beside a real eval episode
    from dynalm.config import load_config

    src = load_config(args.config).env
    turns = src.turns if src.kind == "dialog" else src.max_turns  # the real episodes' length
    imagined = run / "eval-imagined.json"
    out["imagined_eval_seconds"] = round(dynalm("eval", "--model", "smollm2-135m-instruct", "-c", args.config, "--out", str(imagined),
                                                "--set", "env.kind=model", "--set", f"env.path={em}", "--set", "rewards=[]",
                                                "--set", "eval.max_prompts=4", "--set", "log.progress=false",
                                                "--set", f"env.max_turns={turns}"), 1)
    ev = json.loads(imagined.read_text())["model"]
    out["imagined_eval"] = {k: v for k, v in ev.items() if k != "samples"}
    out["imagined_episode"] = ev["samples"][0].get("turns")
    real = [json.loads(x) for x in (run / "transcripts.jsonl").read_text().splitlines()] if (run / "transcripts.jsonl").is_file() else []
    out["real_episode"] = real[0] if real else None
    out["dialog_simulator"] = simulator_nll(run, em)
    p = write_result(f"env_model-{name}", out)

    m = out["env_model"]
    b, t, base = m["prompted_base"], m["trained"], m["baselines"]
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    print(f"machine: {out['machine']}; {out['transitions']} transitions, {m['train_episodes']} train / {m['eval_episodes']} held-out episodes")
    print("| held-out metric | prompted base | trained env model |")
    print("|---|---|---|")
    print(f"| next-observation NLL / token | {f(b['nll_per_token'])} | {f(t['nll_per_token'])} |")
    print(f"| perplexity | {f(b['perplexity'], 1)} | {f(t['perplexity'], 1)} |")
    print(f"| reward MAE (mean predictor: {f(base['reward_mae_of_the_mean'])}) | – | {f(t['reward_mae'])} |")
    print(f"| reward Pearson r | – | {f(t['reward_pearson'])} |")
    print(f"| termination accuracy (majority: {f(base['termination_accuracy_of_the_majority'])}) | – | {f(t['termination_accuracy'])} |")
    if out.get("dialog_simulator"):
        d = out["dialog_simulator"]
        print(f"| the dialog's own simulator prompt (persona + goal), base model | {f(d['nll_per_token'])} | – |")
    print(f"wrote {p}")


if __name__ == "__main__":
    main()
