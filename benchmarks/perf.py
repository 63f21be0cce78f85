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

SIDES = ["dynalm-grpo", "trl-grpo", "dynalm-ppo", "trl-ppo"]
TRL_VERSION = {"grpo": "1.16.0", "ppo": "1.12.0"}
TORCH_PIN = "torch==2.13.0"  # the CPU build on these machines; an unpinned torch pulls CUDA
# TRL venvs get the versions dynalm itself runs with (fallbacks: requirements-dev.txt's pins).
SHARED = {"transformers": "5.23.0", "tokenizers": "0.23.3", "peft": "0.21.2", "accelerate": "1.15.0",
          "datasets": "5.2.0", "safetensors": "0.8.0", "vaderSentiment": "3.3.2"}

MODEL = "smollm2-135m-instruct"
DATA = "builtin:story_train"
TEMPLATE = "Continue this story: {prompt}"
BATCH = 8
MAX_NEW_TOKENS = 48
LORA_R, LORA_ALPHA = 16, 32
GRPO = {"num_generations": 8, "beta": 0.04, "clip": 0.2}
PPO = {"kl_coef": 0.05, "clip": 0.2, "clip_value": 0.2, "vf_coef": 0.1, "lam": 0.95}
MAX_PROMPT_TOKENS = 256  # dynalm's default model.max_prompt_tokens; story openings are far shorter


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


# ----------------------------------------------------------------------------- arithmetic


def update_flops(n: dict, real_tokens: int, completion_tokens: int) -> float:
    """Model FLOPs of one LoRA forward+backward over the batch (no attention-score FLOPs):
    frozen trunk 4·N_trunk per token (forward 2, backward 2 for the activation gradients; no
    weight gradients), LM head 4·N_head per completion token (logits only where log-probs are
    needed), LoRA 6·N_lora per token (forward, activation and weight gradients)."""
    return 4 * n["trunk"] * real_tokens + 4 * n["head"] * completion_tokens + 6 * n["lora"] * real_tokens


def update_flops_6n(n: dict, real_tokens: int) -> float:
    """The common 6·N·tokens convention with N = non-embedding parameters (over-credits LoRA)."""
    return 6 * n["trunk"] * real_tokens


def generation_bound(n: dict, rows: int, prompt_width: int, decode_steps: int, peak_flops: float, bw: float) -> dict:
    """Lower bound on sampling time: one prefill over rows×prompt_width tokens, then
    decode_steps−1 incremental forwards over `rows` tokens; each costs max(FLOPs / matmul peak,
    bytes / copy bandwidth). Bytes per forward = all weights (float32, LM head included) +
    the KV cache read. Tokens that finished early are still computed (the batch is padded)."""
    w = n["trunk"] + n["head"] + n["lora"]
    wbytes = 4 * w
    prefill_flops = 2 * (n["trunk"] + n["lora"]) * rows * prompt_width + 2 * n["head"] * rows
    prefill = {"flops": prefill_flops, "compute_s": prefill_flops / peak_flops, "memory_s": wbytes / bw}
    t = max(prefill["compute_s"], prefill["memory_s"])
    mem_bound = 0
    for k in range(1, decode_steps):
        ctx = prompt_width + k
        kv = 4 * 2 * n["layers"] * n["kv_dim"] * rows * ctx
        tc, tm = 2 * w * rows / peak_flops, (wbytes + kv) / bw
        mem_bound += tm >= tc
        t += max(tc, tm)
    return {"bound_s": t, "memory_bound_steps": mem_bound, "decode_steps": decode_steps, "prefill": prefill}


# ----------------------------------------------------------------------------- summary


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict], n: dict, peak: float, bw: float, warmup: int) -> dict:
    kept = [s for r in runs for s in r["steps"] if s["step"] > warmup]
    if not kept:
        kept = [s for r in runs for s in r["steps"]]
    score = [s["reward_s"] + s["reference_s"] for s in kept]
    update = [s["step_s"] - s["generation_s"] - s["reward_s"] - s["reference_s"] for s in kept]
    toks = sum(s["completion_tokens"] for s in kept)
    out = {
        "runs": len(runs),
        "steps_timed": len(kept),
        "step_s": med([s["step_s"] for s in kept]),
        "generation_s": med([s["generation_s"] for s in kept]),
        "scoring_s": med(score),
        "reward_s": med([s["reward_s"] for s in kept]),
        "reference_s": med([s["reference_s"] for s in kept]),
        "update_s": med(update),
        "completion_tokens_per_s": toks / sum(s["step_s"] for s in kept),
        "generation_tokens_per_s": toks / sum(s["generation_s"] for s in kept),
        "completion_tokens_per_step": toks / len(kept),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_median": med([r["peak_rss_mb"] for r in runs]),
    }
    # reward curve: mean over seeds at each step (warm-up step included: it is a training step)
    nsteps = min(len(r["steps"]) for r in runs)
    curve = [statistics.fmean(r["steps"][i]["reward"] for r in runs) for i in range(nsteps)]
    k = max(1, min(3, nsteps // 2))
    out["reward_curve"] = curve
    out["reward_first"] = statistics.fmean(curve[:k])
    out["reward_last"] = statistics.fmean(curve[-k:])
    out["reward_window"] = k
    # generation against its bound, over the kept steps
    if all("decode_steps" in s for s in kept):
        b = [generation_bound(n, s["rows"], s.get("prompt_width", s.get("seq_width", 0) - s["decode_steps"]),
                              s["decode_steps"], peak, bw) for s in kept]
        bound = sum(x["bound_s"] for x in b)
        out["generation_bound"] = {
            "bound_s_per_step": bound / len(kept),
            "measured_s_per_step": sum(s["generation_s"] for s in kept) / len(kept),
            "efficiency": bound / sum(s["generation_s"] for s in kept),
            "memory_bound_fraction": sum(x["memory_bound_steps"] for x in b) / max(1, sum(x["decode_steps"] - 1 for x in b)),
            "mean_rows": statistics.fmean(s["rows"] for s in kept),
            "mean_prompt_width": statistics.fmean(s.get("prompt_width", s.get("seq_width", 0) - s["decode_steps"]) for s in kept),
            "mean_decode_steps": statistics.fmean(s["decode_steps"] for s in kept),
            "prefill_gflops": statistics.fmean(x["prefill"]["flops"] for x in b) / 1e9,
            "prefill_compute_s": statistics.fmean(x["prefill"]["compute_s"] for x in b),
            "prefill_memory_s": statistics.fmean(x["prefill"]["memory_s"] for x in b),
        }
    if all("trainer_update_s" in s for s in kept):  # dynalm: model-FLOPs utilisation of the update
        fl = sum(update_flops(n, s["real_tokens"], s["completion_tokens"]) for s in kept)
        fl6 = sum(update_flops_6n(n, s["real_tokens"]) for s in kept)
        t = sum(s["trainer_update_s"] for s in kept)
        out["update_mfu"] = {
            "flops_per_step": fl / len(kept),
            "update_s_per_step": t / len(kept),
            "achieved_gflops": fl / t / 1e9,
            "mfu": fl / t / peak,
            "mfu_6n": fl6 / t / peak,
            "mean_real_tokens": statistics.fmean(s["real_tokens"] for s in kept),
            "mean_padded_tokens": statistics.fmean(s["rows"] * s["seq_width"] for s in kept),
            "mean_completion_tokens": statistics.fmean(s["completion_tokens"] for s in kept),
        }
    return out


RATIO_KEYS = [("step_s", "s/step"), ("generation_s", "generation"), ("scoring_s", "scoring"), ("update_s", "update"),
              ("completion_tokens_per_s", "completion tok/s"), ("peak_rss_mb", "peak RSS")]


def ratios(summary: dict) -> dict:
    out = {}
    for algo in ("grpo", "ppo"):
        d, t = summary.get(f"dynalm-{algo}"), summary.get(f"trl-{algo}")
        if d and t:
            out[algo] = {k: d[k] / t[k] if t[k] else float("nan") for k, _ in RATIO_KEYS}
    return out


def check_targets(summary: dict, n: dict, peak: float, bw: float) -> list[dict]:
    """Issue 16's targets (issue 7 had 40 %, 50 % and 3 GB; the s/step ratio is in the ratios table)."""
    rows = []
    for algo in ("ppo", "grpo"):
        s = summary.get(f"dynalm-{algo}")
        if not s:
            continue
        if "update_mfu" in s:
            m = s["update_mfu"]["mfu"]
            rows.append({"target": f"dynalm {algo} update ≥ 60% of the float32 matmul peak (MFU)", "value": f"{m:.1%}", "met": m >= 0.60})
        if "generation_bound" in s:
            e = s["generation_bound"]["efficiency"]
            rows.append({"target": f"dynalm {algo} generation ≥ 70% of its bound", "value": f"{e:.1%}", "met": e >= 0.70})
    s = summary.get("dynalm-ppo")
    if s:
        gb = s["peak_rss_mb"] * 2**20 / 1e9
        rows.append({"target": "dynalm ppo (SmolLM2-135M + LoRA) peak memory ≤ 2.5 GB", "met": gb <= 2.5,
                     "value": f"{gb:.2f} GB ({s['peak_rss_mb'] / 1024:.2f} GiB) peak RSS"})
    return rows


# ----------------------------------------------------------------------------- report


def fmt_s(x):
    return f"{x:.2f}"


def write_markdown(path: Path, res: dict) -> None:
    s, n, mach = res["summary"], res["model_params"], res["machine"]
    peak, bw = res["peak_flops"], res["bandwidth_bytes_per_s"]
    L = []
    L.append("# dynalm vs TRL: speed, memory and reward on identical work\n")
    L.append(f"Command: `{res['command']}`  ")
    L.append(f"Machine: {mach['cpu']}; {res['threads']} torch threads per run; {res['date']}  ")
    warm = "step 1 is warm-up, left out of medians and rates" if res["warmup_steps_dropped"] else "no warm-up step left out"
    L.append(f"Steps per run: {res['steps']} ({warm}); seeds: {', '.join(map(str, res['seeds']))}; "
             f"sides run in subprocesses, one at a time, interleaved per seed  ")
    v = res["versions"]
    L.append(f"Versions: dynalm {v.get('dynalm', '?')}; TRL {v.get('trl-grpo', '-')} (GRPO), {v.get('trl-ppo', '-')} (PPO); "
             f"torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')} on both sides"
             + "".join(f"; except {k}: {val}" for k, val in v.items() if k.count("-") == 2) + "\n")
    L.append("## Per side (medians over timed steps of all seeds)\n")
    L.append("| side | s/step | generation | scoring (reward + ref) | update | completion tok/s | peak RSS | reward first→last |")
    L.append("|---|---|---|---|---|---|---|---|")
    for side in SIDES:
        x = s.get(side)
        if not x:
            continue
        L.append(f"| {side} | {fmt_s(x['step_s'])} | {fmt_s(x['generation_s'])} | {fmt_s(x['scoring_s'])} "
                 f"({fmt_s(x['reward_s'])} + {fmt_s(x['reference_s'])}) | {fmt_s(x['update_s'])} | "
                 f"{x['completion_tokens_per_s']:.1f} | {x['peak_rss_mb'] * 2**20 / 1e9:.2f} GB | "
                 f"{x['reward_first']:+.3f} → {x['reward_last']:+.3f} |")
    L.append("")
    L.append("Seconds per step. *update* = step − generation − scoring: the optimisation pass plus each library's "
             "per-step bookkeeping. *scoring* = the reward (VADER) + the no-grad forwards outside sampling "
             "(reference log-probs; dynalm also counts its advantage computation here, TRL PPO its value-model "
             "forward). completion tok/s = completion tokens (EOS included) ÷ whole-step time. Peak RSS = the "
             "largest resident set of the run's process up to its last step (ru_maxrss; GB = 10⁹ bytes), max over seeds. "
             f"Reward = mean VADER compound of the step's completions, mean over seeds, first vs last {s[next(iter(s))]['reward_window']} steps.\n")
    r = res["ratios"]
    if r:
        L.append("## dynalm ÷ TRL\n")
        L.append("| algorithm | " + " | ".join(lbl for _, lbl in RATIO_KEYS) + " |")
        L.append("|---|" + "---|" * len(RATIO_KEYS))
        for algo, x in r.items():
            L.append(f"| {algo} | " + " | ".join(f"{x[k]:.2f}" for k, _ in RATIO_KEYS) + " |")
        L.append("\nBelow 1 is better for dynalm in every column but completion tok/s (above 1 is better there).\n")
    L.append("## Targets\n")
    L.append("| target | measured | met |")
    L.append("|---|---|---|")
    for t in res["targets"]:
        L.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |")
    L.append("")
    L.append("## The arithmetic\n")
    ms = res["machine_measurements"]
    L.append(f"Float32 matmul peak: median of 9 `torch.matmul` of {ms[0]['matmul_n']}² matrices, 2·n³ FLOP each: "
             + ", ".join(f"{m['matmul_gflops']:.1f}" for m in ms) + f" GFLOP/s over the session; used: the largest, **{peak / 1e9:.1f} GFLOP/s**.  ")
    L.append("Memory bandwidth: median of 7 copies of a 512 MiB float32 tensor, bytes read + written: "
             + ", ".join(f"{m['copy_gbs']:.1f}" for m in ms) + f" GB/s; used: the largest, **{bw / 1e9:.1f} GB/s** "
             f"(read-only `sum`: {max(m['read_gbs'] for m in ms):.1f} GB/s).\n")
    lo, hi = min(m["matmul_gflops"] for m in ms), max(m["matmul_gflops"] for m in ms)
    if lo < 0.9 * hi:
        L.append(f"**Warning:** the matmul peak varied from {lo:.1f} to {hi:.1f} GFLOP/s during the session: something else "
                 "was likely using the CPU. The interleaving spreads such drift over both libraries, so the ratios hold "
                 "up better than the absolute numbers; rerun on a quiet machine for those.\n")
    L.append(f"Model: {n['total'] / 1e6:.1f} M parameters = trunk (decoder layers + norm) N_trunk = {n['trunk'] / 1e6:.2f} M + "
             f"embedding {n['embedding'] / 1e6:.2f} M, tied to the LM head (N_head = {n['head'] / 1e6:.2f} M); "
             f"LoRA r={LORA_R} on {', '.join(res['lora_targets'])}: N_lora = {n['lora'] / 1e6:.3f} M.\n")
    for algo in ("ppo", "grpo"):
        x = s.get(f"dynalm-{algo}")
        if x and "update_mfu" in x:
            u = x["update_mfu"]
            L.append(f"**dynalm {algo} update MFU.** FLOPs per step = 4·N_trunk·T + 4·N_head·C + 6·N_lora·T, with T = real "
                     f"(unpadded) prompt+completion tokens through the model ({u['mean_real_tokens']:.0f} per step; "
                     f"{u['mean_padded_tokens']:.0f} with padding) and C = completion tokens ({u['mean_completion_tokens']:.0f}): the frozen "
                     "weights need the forward (2·N) and the activation gradients (2·N) but no weight gradients; the LM "
                     "head runs only where log-probs are needed; LoRA needs all three (6·N). Attention-score FLOPs "
                     f"are left out (a few percent here). = {u['flops_per_step'] / 1e9:.1f} GFLOP per step in "
                     f"{u['update_s_per_step']:.2f} s (dynalm's time/update) = {u['achieved_gflops']:.1f} GFLOP/s = "
                     f"**{u['mfu']:.1%}** of {peak / 1e9:.1f}. (With the common 6·N_trunk·T, which credits weight "
                     f"gradients that LoRA never computes: {u['mfu_6n']:.1%}.)\n")
    for algo in ("ppo", "grpo"):
        x = s.get(f"dynalm-{algo}")
        if x and "generation_bound" in x:
            g = x["generation_bound"]
            w = n["trunk"] + n["head"] + n["lora"]
            rows = g["mean_rows"]
            tm = 4 * w / bw
            tc = 2 * w * rows / peak
            L.append(f"**dynalm {algo} generation bound.** Per decode step the {rows:.0f} rows read all weights once: "
                     f"{w / 1e6:.1f} M × 4 B = {4 * w / 1e6:.0f} MB at {bw / 1e9:.1f} GB/s = {tm * 1e3:.1f} ms (+ the KV cache); "
                     f"compute 2·{w / 1e6:.1f} M·{rows:.0f} = {2 * w * rows / 1e9:.2f} GFLOP at {peak / 1e9:.1f} GFLOP/s = {tc * 1e3:.1f} ms; "
                     f"so {'memory bandwidth' if tm >= tc else 'compute'} binds ({g['memory_bound_fraction']:.0%} of decode steps memory-bound). "
                     f"Plus one prefill over {rows:.0f}×{g['mean_prompt_width']:.0f} prompt tokens: {g['prefill_gflops']:.0f} GFLOP = "
                     f"{g['prefill_compute_s']:.2f} s of compute vs {g['prefill_memory_s']:.2f} s of weight reads "
                     f"({'compute' if g['prefill_compute_s'] >= g['prefill_memory_s'] else 'memory'}-bound). "
                     f"With {g['mean_decode_steps']:.1f} decode steps per batch on average: bound {g['bound_s_per_step']:.2f} s "
                     f"vs measured {g['measured_s_per_step']:.2f} s (time/rollout, which also tokenises and decodes) = "
                     f"**{g['efficiency']:.1%}** of the bound.\n")
    other = [f"{side}: {s[side]['generation_bound']['efficiency']:.1%}" for side in SIDES
             if side.startswith("trl") and side in s and "generation_bound" in s[side]]
    if other:
        L.append("The same bound for TRL's sampling (its own batch shapes): " + "; ".join(other) + ".\n")
    L.append("## Identical work, and what differs\n")
    for line in res["settings"]:
        L.append(f"- {line}")
    L.append("")
    L.append("## Reward per step (mean over seeds)\n")
    present = [side for side in SIDES if side in s]
    L.append("| step | " + " | ".join(present) + " |")
    L.append("|---|" + "---|" * len(present))
    nst = max(len(s[side]["reward_curve"]) for side in present)
    for i in range(nst):
        cells = [f"{s[side]['reward_curve'][i]:+.3f}" if i < len(s[side]["reward_curve"]) else "" for side in present]
        L.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    L.append("")
    path.write_text("\n".join(L) + "\n")


SETTINGS = [
    "Model: SmolLM2-135M-Instruct (dynalm's embedded model, resolved by `dynalm.models.loading.resolve_model_dir`), float32, "
    "loaded by `from_pretrained` on both sides; LoRA r=16, α=32, dropout 0, on q/k/v/o_proj (dynalm's default targets).",
    "Prompts: builtin:story_train through \"Continue this story: {prompt}\" and the chat template (no system message: the "
    "template's default); the first prompts' token ids are checked equal to dynalm's on every TRL run; prompt order = "
    "dynalm's seeded sampler (TRL's shuffling is off / its dataloader replaced by an unshuffled one).",
    "Reward: VADER compound (vaderSentiment, same version) of the decoded completion. TRL GRPO: a reward function; TRL PPO: "
    "an nn.Module reward model whose backbone decodes each row, keeps the text after the last assistant header up to EOS, "
    "and returns the score at every position (TRL's get_reward reads it at the last response token).",
    "Sampling: temperature 1, top-p 1, top-k off, ≤ 48 new tokens, stop at EOS (<|im_end|>).",
    "Batch: 8 completions per step; grpo 1 prompt × 8 completions, ppo 8 prompts × 1; one optimisation epoch, one "
    "minibatch of 8; constant learning rate (see `lr`), Adam/AdamW without weight decay.",
    "GRPO: β = 0.04 (k3 KL to the reference in the loss on both sides, so both run the reference forward; TRL's default "
    "β = 0 would skip it), clip ε = 0.2, group-std scaling, token-mean loss (TRL loss_type 'dapo' = dynalm's masked mean), "
    "grad-norm clip 1.0 on both.",
    "PPO: KL penalty in the reward, k1, coefficient 0.05; GAE γ = 1, λ = 0.95; advantages whitened; clip 0.2, value clip "
    "0.2, value-loss coefficient 0.1 on both.",
    "Different by design, not removable: TRL's PPO trains a separate value model (a full SmolLM2 trunk with a scalar head, "
    "all 134.5 M weights trained: an extra forward in scoring, an extra forward+backward and Adam state in the update); "
    "dynalm's ppo puts a linear value head on the policy's trunk and reads values during sampling. TRL's PPO computes "
    "the LM head over every position in its reference and update forwards; dynalm only over the completion. TRL's PPO clips no gradient "
    "norm (dynalm: 1.0). TRL's PPO keeps generating to 48 tokens only as long as some row is unfinished, as dynalm does.",
    "Gradient checkpointing is off on both (TRL's config default is on; dynalm keeps activations), unless "
    "dynalm's side has `--dynalm-set` overrides (listed under Command).",
    "Timing: dynalm's phases are its own metrics (time/rollout, time/reward, time/reference, time/update); TRL's come "
    "from wrapping its functions (GRPOTrainer._generate, ._calculate_rewards, no-grad ._get_per_token_logps_and_entropies; "
    "PPO's batch_generation, get_reward, no-grad forward), with step ends from TrainerCallback.on_step_end. On every side "
    "s/step is the wall time between consecutive step ends.",
]


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
