"""benchmarks/perf.py's arithmetic and report: model FLOPs of an update, the generation's
bandwidth and compute bounds, medians per side, dynalm ÷ TRL ratios, issue 16's targets, and
perf.md."""

from __future__ import annotations

import statistics
from pathlib import Path

from perf_work import LORA_R, SIDES


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
