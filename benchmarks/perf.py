"""dynalm vs TRL on identical RL work, in one session: speed, memory, reward (issue 7).

    make bench
    python benchmarks/perf.py [--steps 10] [--seeds 3] [--only dynalm-ppo,trl-ppo] [--threads N] [--out DIR]

Sides: dynalm `grpo` vs TRL 1.16.0 GRPOTrainer, dynalm `ppo` vs TRL 1.12.0
trl.experimental.ppo.PPOTrainer (the last TRL release with PPO). Each TRL version lives in its
own venv under .bench/ (built here on first use: torch==2.13.0 pinned, and the very
transformers/peft/accelerate/datasets/vadersentiment versions dynalm runs with, so both sides
run the same model code); TRL is never a dependency of dynalm.

Same work on every side: the embedded SmolLM2-135M-Instruct in float32, found through
dynalm's own loader; the story openings of builtin:story_train through the template
"Continue this story: {prompt}" and the chat template (token ids checked equal on both sides),
in the same order (dynalm's seeded prompt sampler); reward = VADER compound of the completion;
8 completions per step (grpo: 1 prompt x 8, ppo: 8 prompts x 1); at most 48 new tokens at
temperature 1; LoRA r=16 alpha=32 on q/k/v/o; one optimisation epoch, one minibatch; the same
learning rate, clip ranges and KL settings (see WORK below and the markdown report).

Each seed runs the four sides one after another in subprocesses, interleaved so that drift
of the machine hits both libraries (the order inside each dynalm/TRL pair alternates between
seeds). Step 1 of each run is warm-up and left out of the medians. The machine's float32
matmul peak and memory bandwidth are measured before each seed and at the end.

Writes DIR/perf.json (everything, per step) and DIR/perf.md (tables); raw runs go to
.bench/runs/. Default DIR: benchmarks/results.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH = ROOT / ".bench"
sys.path.insert(0, str(HERE))
from common import machine, median_seconds  # noqa: E402
from perf_report import SETTINGS, check_targets, ratios, summarize, write_markdown  # noqa: E402
from perf_work import (  # noqa: E402
    BATCH, DATA, GRPO, LORA_ALPHA, LORA_R, MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MODEL, PPO, SHARED, SIDES, TEMPLATE,
    TORCH_PIN, TRL_VERSION,
)




# ----------------------------------------------------------------------------- environments


def shared_pins() -> list[str]:
    out = []
    for name, fallback in SHARED.items():
        try:
            v = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            v = fallback
        out.append(f"{name}=={v}")
    return out


def ensure_venv(version: str) -> Path:
    """.bench/trl-VERSION with TRL and dynalm's library versions; rebuilt when the pins change."""
    d = BENCH / f"trl-{version}"
    spec = "\n".join([TORCH_PIN, f"trl=={version}", *shared_pins()]) + "\n"
    marker = d / ".installed"
    py = d / "bin" / "python"
    if marker.is_file() and marker.read_text() == spec and py.exists():
        return py
    print(f"building {d} (trl=={version}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(d)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["--upgrade", "pip"], check=True)
    subprocess.run(pip + [TORCH_PIN], check=True)  # first, alone: nothing after it may swap it for a CUDA build
    subprocess.run(pip + spec.split()[1:] + [TORCH_PIN], check=True)
    marker.write_text(spec)
    return py


# ----------------------------------------------------------------------------- the machine


def measure_machine(threads: int) -> dict:
    """Median float32 matmul GFLOP/s (2048^3), copy and read bandwidth (512 MiB tensors)."""
    import torch

    torch.set_num_threads(threads)

    def med(fn, reps):
        return median_seconds(fn, reps, warm=2)

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    t_mm = med(lambda: torch.matmul(a, b, out=c), 9)
    del a, b, c
    x = torch.ones(2**27)  # 512 MiB
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    t_copy = med(lambda: y.copy_(x), 7)
    t_read = med(lambda: x.sum(), 7)
    del x, y
    return {
        "threads": threads,
        "matmul_n": n,
        "matmul_gflops": 2 * n**3 / t_mm / 1e9,
        "copy_gbs": 2 * nbytes / t_copy / 1e9,  # bytes read + bytes written
        "read_gbs": nbytes / t_read / 1e9,
        "at": time.strftime("%H:%M:%S"),
    }


def model_counts(model_dir: str, targets: list[str]) -> dict:
    """Parameter counts from the config alone (meta device): what the FLOP arithmetic needs."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    emb = m.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in m.parameters())  # tied embedding counted once
    head = m.get_output_embeddings().weight.numel()
    lora = sum(LORA_R * (mod.in_features + mod.out_features) for name, mod in m.named_modules()
               if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in targets)
    tc = cfg.get_text_config()
    return {
        "total": total,
        "embedding": emb,
        "trunk": total - emb,  # decoder layers + final norm: every token passes all of them
        "head": head,  # lm_head (tied to the embedding): only at positions whose logits are needed
        "lora": lora,
        "layers": tc.num_hidden_layers,
        "kv_dim": tc.num_key_value_heads * (getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads),
        "hidden": tc.hidden_size,
        "vocab": tc.vocab_size,
        "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
    }


# ----------------------------------------------------------------------------- work


def make_work(algo: str, seed: int, a, model_dir: str, tok, rows: list[dict], targets: list[str]) -> dict:
    """What both sides run: dynalm's prompt order for this seed, rendered once, and the knobs."""
    from dynalm.data import render_template
    from dynalm.models.generation import encode_prompts, render_prompt
    from dynalm.rl.trainer import PromptSampler

    per_step = BATCH // (GRPO["num_generations"] if algo == "grpo" else 1)
    sampler = PromptSampler(len(rows), seed, shuffle=True)  # as dynalm's Trainer builds it
    steps = [[{"prompt": rows[i]["prompt"], "text": render_template(TEMPLATE, rows[i], "prompt")}
              for i in sampler.take(per_step)] for _ in range(a.steps)]
    check = []
    for p in [x for s in steps for x in s][:4]:
        rendered = render_prompt(tok, p["text"], chat=True, system_prompt=None)
        ids, _, _ = encode_prompts(tok, [rendered], MAX_PROMPT_TOKENS, "cpu")
        check.append({"text": p["text"], "ids": ids[0].tolist()})
    return {
        "algo": algo, "seed": seed, "threads": a.threads, "lr": a.lr, "batch": BATCH, "max_new_tokens": MAX_NEW_TOKENS,
        "model_name": MODEL, "model_dir": model_dir, "data": DATA, "template": TEMPLATE,
        "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "lora_targets": targets,
        "grpo": GRPO, "ppo": PPO, "steps": steps, "check": check, "dynalm_set": list(a.dynalm_set),
    }


def run_side(side: str, work: dict, rundir: Path, pythons: dict, timeout: float) -> dict:
    lib, algo = side.split("-")
    tag = f"{side}-seed{work['seed']}"
    wpath, opath, log = rundir / f"{tag}.work.json", rundir / f"{tag}.json", rundir / f"{tag}.log"
    wpath.write_text(json.dumps(work))
    py = sys.executable if lib == "dynalm" else str(pythons[algo])
    script = HERE / ("dynalm_side.py" if lib == "dynalm" else "trl_side.py")
    n = str(work["threads"])
    env = dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", PYTHONUNBUFFERED="1")
    t = time.perf_counter()
    with open(log, "w") as fh:
        try:
            rc = subprocess.run([py, str(script), "--algo", algo, "--work", str(wpath), "--out", str(opath)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc != 0 or not opath.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{tag} failed ({rc}); last lines of {log}:\n{tail}")
    res = json.loads(opath.read_text())
    res["seed"] = work["seed"]
    res["process_s"] = time.perf_counter() - t
    return res




# ----------------------------------------------------------------------------- main


def git_commit() -> str:
    """' (commit abc1234)' for the checkout being measured; '+ changes' when src/ differs from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f" (commit {head}{' + uncommitted changes in src/' if dirty else ''})"


def main() -> None:
    ap = argparse.ArgumentParser(description="dynalm vs TRL on identical RL work (issue 7)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per run (step 1 is warm-up)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each running every side")
    ap.add_argument("--only", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on every side")
    ap.add_argument("--lr", type=float, default=3e-4, help="learning rate on every side")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for perf.json and perf.md")
    ap.add_argument("--dynalm-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for dynalm's side only (e.g. train.gradient_checkpointing=true)")
    a = ap.parse_args()
    sides = [x.strip() for x in a.only.split(",") if x.strip()]
    bad = [x for x in sides if x not in SIDES]
    if bad or not sides:
        ap.error(f"--only: unknown side(s) {bad}; choose from {SIDES}")
    if a.steps < 1 or a.seeds < 1:
        ap.error("--steps and --seeds must be at least 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    pythons = {algo: ensure_venv(TRL_VERSION[algo]) for algo in ("grpo", "ppo") if f"trl-{algo}" in sides}

    import torch
    from transformers import AutoTokenizer

    import dynalm
    from dynalm.data import read_rows
    from dynalm.models.loading import resolve_model_dir
    from dynalm.models.policy import lora_targets

    model_dir, _ = resolve_model_dir(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = read_rows(DATA)
    import json as _json

    mtype = _json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    targets = list(lora_targets(mtype, None))
    counts = model_counts(model_dir, targets)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    rundir = BENCH / "runs" / stamp
    rundir.mkdir(parents=True, exist_ok=True)
    timeout = 300 + 240 * a.steps
    measurements = []
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    t_start = time.perf_counter()
    for j, seed in enumerate(range(a.seeds)):
        measurements.append(measure_machine(a.threads))
        m = measurements[-1]
        print(f"seed {seed}: matmul {m['matmul_gflops']:.1f} GFLOP/s, copy {m['copy_gbs']:.1f} GB/s", flush=True)
        order = []
        for pair in (("dynalm-grpo", "trl-grpo"), ("dynalm-ppo", "trl-ppo")):
            order += list(pair if j % 2 == 0 else pair[::-1])
        for side in order:
            if side not in sides:
                continue
            work = make_work(side.split("-")[1], seed, a, model_dir, tok, rows, targets)
            t = time.perf_counter()
            res = run_side(side, work, rundir, pythons, timeout)
            runs[side].append(res)
            st = sorted(x["step_s"] for x in res["steps"][1:]) or [res["steps"][0]["step_s"]]
            print(f"  {side:12s} seed {seed}: {time.perf_counter() - t:6.1f}s in all, median step {statistics.median(st):.2f}s, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    measurements.append(measure_machine(a.threads))
    wall = time.perf_counter() - t_start

    peak = max(m["matmul_gflops"] for m in measurements) * 1e9
    bw = max(m["copy_gbs"] for m in measurements) * 1e9
    warmup = 1 if a.steps > 1 else 0
    summary = {side: summarize(runs[side], counts, peak, bw, warmup) for side in SIDES if runs.get(side)}
    versions = {"dynalm": getattr(dynalm, "__version__", "?") + git_commit(), "torch": torch.__version__,
                "transformers": importlib.metadata.version("transformers"), "peft": importlib.metadata.version("peft")}
    for side in sides:
        if side.startswith("trl") and runs[side]:
            versions[side] = runs[side][0]["versions"]["trl"]
            for k in ("torch", "transformers", "peft"):
                if runs[side][0]["versions"][k] != versions[k]:
                    versions[f"{side}-{k}"] = runs[side][0]["versions"][k]
    flags = "".join(
        f" {flag} {val}" for flag, val, default in [
            ("--steps", a.steps, 10), ("--seeds", a.seeds, 3), ("--only", a.only, ",".join(SIDES)),
            ("--threads", a.threads, os.cpu_count() or 1), ("--lr", a.lr, 3e-4), ("--out", a.out, str(HERE / "results"))]
        if val != default).strip()
    flags += "".join(f" --dynalm-set {x}" for x in a.dynalm_set)
    if os.environ.get("MAKELEVEL"):
        cmd = f'make bench BENCH_ARGS="{flags}"' if flags else "make bench"
    else:
        cmd = f"python benchmarks/perf.py {flags}".strip()
    res = {
        "command": cmd,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": machine()},
        "threads": a.threads,
        "steps": a.steps,
        "seeds": list(range(a.seeds)),
        "warmup_steps_dropped": warmup,
        "wall_s": wall,
        "lr": a.lr,
        "versions": versions,
        "lora_targets": targets,
        "grpo": GRPO,
        "ppo": PPO,
        "machine_measurements": measurements,
        "peak_flops": peak,
        "bandwidth_bytes_per_s": bw,
        "model_params": counts,
        "settings": SETTINGS + [f"Learning rate {a.lr:g} on every side; {a.threads} torch threads (OMP/MKL too) on every side."],
        "summary": summary,
        "ratios": ratios(summary),
        "targets": check_targets(summary, counts, peak, bw),
        "runs": runs,
        "raw": str(rundir),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    write_markdown(out / "perf.md", res)
    print(f"wrote {out / 'perf.json'} and {out / 'perf.md'} ({wall / 60:.1f} min)")
    print((out / "perf.md").read_text())


if __name__ == "__main__":
    main()
