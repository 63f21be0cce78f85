"""A critic started from a reward model trained on prefixes of rated rollouts (issue 14).

    python benchmarks/critic_init.py --config configs/sentiment.yaml [--prompts 128] [--per-prompt 4]
                                     [--prefixes 4] [--epochs 2] [--steps 20] [--set k=v ...] [--name NAME]

OpenRLHF and PPO-MCTS start the critic from a reward model; a reward model trained on finished
text alone has never seen a state, so this one is also trained on prefixes of each rated
completion with the completion's reward as the target (`dynalm train-rm --set prefixes=K`,
the Monte-Carlo value of the state the cut leaves). Four phases, each timed:

1. rollouts: `--per-prompt` completions of the first `--prompts` *training* prompts from the
   config's untrained policy, scored with its reward, written as rated completions
   (`runs/critic_init-NAME/rollouts.jsonl`, the prompt as the data rows give it; the reward
   model renders it with the config's own `data.template`, checked to match the policy's state);
2. `dynalm train-rm` on them with `prefixes=K` (10 % of the rollouts held out, with their
   prefixes: the reward model's R² on held-out states before any RL step);
3. `dynalm train` of the config with `model.critic=model`, `model.critic_init=` that folder;
4. `benchmarks/value_probe.py` on that run (held-out eval prompts, 2 rollouts each).

Writes benchmarks/results/critic_init-NAME.json (and value_probe-critic_init-NAME.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


def dynalm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dynalm", *args], check=True)


@torch.no_grad()
def rollouts(a, out: Path) -> int:
    from dynalm.config import load_config
    from dynalm.envs import make_env
    from dynalm.models.generation import decode_completions, encode_prompts, render_prompt, sample
    from dynalm.models.policy import PolicyValueModel
    from dynalm.run import set_threads, train_rows

    cfg = load_config(a.config, a.set)
    set_threads(cfg)
    model = PolicyValueModel.from_config(cfg).eval()
    env = make_env(cfg, model)
    prompts = train_rows(cfg)[: a.prompts]
    field = cfg.data.prompt_field
    state = env.reset(prompts[0])
    shown = render_prompt(model.tokenizer, cfg.data.template.format(prompt=prompts[0][field]), chat=True, system_prompt=None)
    if shown != state:  # the reward model must read the state the critic will read
        sys.exit(f"the reward model's rendering differs from the policy's state:\n{shown!r}\n{state!r}")
    rows = [r for r in prompts for _ in range(a.per_prompt)]
    gen = torch.Generator(device=model.device).manual_seed(a.seed)
    with out.open("w", encoding="utf-8") as f:
        for s in range(0, len(rows), a.batch):
            chunk = rows[s : s + a.batch]
            p_ids, p_mask, _ = encode_prompts(model.tokenizer, [env.reset(r) for r in chunk], cfg.model.max_prompt_tokens, model.device)
            ids, _, amask, _, _, ended = sample(model, p_ids, p_mask, cfg.generation, generator=gen, with_values=False)
            comps = decode_completions(model.tokenizer, ids, amask, ended)
            _, scored, _ = env.step(chunk, comps, ended.tolist())
            for r, c, x in zip(chunk, comps, scored.scores):
                f.write(json.dumps({"prompt": r[field], "completion": c, "reward": float(x)}) + "\n")
            print(f"{s + len(chunk)}/{len(rows)} rollouts", flush=True)
    return len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/sentiment.yaml")
    ap.add_argument("--set", action="append", default=[], help="config override for the rollouts and the run")
    ap.add_argument("--prompts", type=int, default=128, help="training prompts to roll out")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    from dynalm.config import load_config

    cfg = load_config(a.config, a.set)
    name = a.name or Path(a.config).stem
    root = Path("runs") / f"critic_init-{name}"
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    n = rollouts(a, root / "rollouts.jsonl")
    seconds["rollouts"] = time.perf_counter() - t

    t = time.perf_counter()
    dynalm("train-rm", "--data", str(root / "rollouts.jsonl"), "--out", str(root / "rm"),
           "--set", f"prefixes={a.prefixes}", "--set", f"epochs={a.epochs}", "--set", f"template={json.dumps(cfg.data.template)}",
           "--set", f"seed={a.seed}")
    seconds["train_rm"] = time.perf_counter() - t
    rm = json.loads((root / "rm" / "reward_model.json").read_text())["metrics"]

    t = time.perf_counter()
    run = root / "run"
    sets = [*a.set, "model.critic=model", f"model.critic_init={root / 'rm'}", f"train.steps={a.steps}", "log.progress=false"]
    dynalm("train", "-c", a.config, "--out", str(run), "--force", *[x for s in sets for x in ("--set", s)])
    seconds["train"] = time.perf_counter() - t

    t = time.perf_counter()
    probe_name = f"value_probe-critic_init-{name}"
    subprocess.run([sys.executable, "benchmarks/value_probe.py", "--run", str(run), "--per-prompt", "2", "--name", probe_name], check=True)
    seconds["value_probe"] = time.perf_counter() - t
    probe = json.loads((Path(__file__).parent / "results" / f"{probe_name}.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    res = {
        "command": "python benchmarks/critic_init.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "config": a.config, "set": a.set, "rollouts": n, "prefixes": a.prefixes, "epochs": a.epochs, "steps": a.steps,
        "reward_model": rm, "run": str(run),
        "eval_reward": {"base": ev["base"]["reward"], "trained": ev["trained"]["reward"]},
        "probe": {"r2_critic": probe["r2_critic"], "by_depth": probe["by_depth"]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    p = write_result(f"critic_init-{name}", res)
    held = rm.get("prefix_after", {})
    print(f"machine: {res['machine']}; reward model on held-out prefixes: r {held.get('pearson')}, mse {held.get('mse')}")
    for row in probe["by_depth"]:
        print(f"  {row['depths']:>10}: critic R² {row['r2_critic']}")
    print(f"eval reward {res['eval_reward']}; seconds {res['seconds']}; wrote {p}")


if __name__ == "__main__":
    main()
