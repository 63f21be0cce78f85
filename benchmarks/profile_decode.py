"""Where a decode step and an update go: timings and a torch.profiler summary by operator.

    python benchmarks/profile_decode.py [--rows 8] [--new 48] [--prompt-tokens 60] [--name profile]

On the embedded SmolLM2-135M-Instruct with LoRA r=16 on q/k/v/o and a value head (ppo's
shape in `make bench`): times `dynalm.models.generation.sample` with EOS off (exactly
`--new` decode steps) split into prefill and per-decode-step time, against the
memory-bandwidth floor of reading every weight once per step; then profiles decode steps
and one update (forward + backward of the ppo loss's log-probs) with torch.profiler:
self CPU time per operator, and the share of wall time no operator accounts for (Python and
framework overhead). Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_result  # noqa: E402


def build(rows: int, new: int, fast: bool):
    from dynalm.config import build_config
    from dynalm.models.policy import PolicyValueModel

    cfg = build_config({
        "model": {"name": "smollm2-135m-instruct", "lora": {"enabled": True, "r": 16, "alpha": 32}, "value_head": True},
        "generation": {"max_new_tokens": new, "temperature": 1.0, "stop_at_eos": False, "fast_decode": fast},
        "train": {"threads": 2, "batch_size": rows},
        "algorithm": {"name": "ppo"},
    })
    torch.set_num_threads(2)
    model = PolicyValueModel.from_config(cfg)
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0, so LoRA's delta is not zero
        g = torch.Generator().manual_seed(0)
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return cfg, model


def prompts(model, rows: int, width: int):
    from dynalm.models.generation import encode_prompts, render_prompt

    words = ("the old lighthouse keeper watched the storm roll in from the sea and wondered whether the ship "
             "would make it past the rocks before nightfall ").split()
    texts = []
    for i in range(rows):
        body = " ".join(words[(i + j) % len(words)] for j in range(width))
        texts.append(render_prompt(model.tokenizer, "Continue this story: " + body, chat=True, system_prompt=None))
    ids, mask, _ = encode_prompts(model.tokenizer, texts, width + 40, model.device)
    return ids[:, -width:], mask[:, -width:]


def time_sample(model, cfg, ids, mask, reps: int) -> dict:
    from dynalm.models.generation import sample

    gen1 = cfg.generation.model_copy(update={"max_new_tokens": 1})
    pre, full = [], []
    for r in range(reps):
        g = torch.Generator().manual_seed(r)
        t = time.perf_counter()
        sample(model, ids, mask, gen1, generator=g)
        pre.append(time.perf_counter() - t)
        g = torch.Generator().manual_seed(r)
        t = time.perf_counter()
        sample(model, ids, mask, cfg.generation, generator=g)
        full.append(time.perf_counter() - t)
    n = cfg.generation.max_new_tokens
    per_step = [(f - p) / (n - 1) for f, p in zip(full, pre)]
    return {"prefill_s": statistics.median(pre), "sample_s": statistics.median(full), "decode_step_ms": 1e3 * statistics.median(per_step),
            "decode_step_ms_all": [round(1e3 * x, 2) for x in per_step]}


def profile(fn, label: str, top: int = 18) -> dict:
    from torch.profiler import ProfilerActivity, profile as tprofile

    fn()  # warm
    t = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        fn()
    wall = time.perf_counter() - t
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key.startswith("mkldnn") or e.key.startswith("onednn")]
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6  # seconds
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    table = [{"op": e.key, "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
              "share_of_wall": round(e.self_cpu_time_total / 1e6 / wall, 4)} for e in rows]
    n_calls = sum(e.count for e in events)
    return {"label": label, "wall_s_profiled": wall, "aten_self_s": self_total, "aten_calls": n_calls,
            "overhead_share": 1 - self_total / wall, "top_ops": table}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=60)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--name", default="profile")
    ap.add_argument("--hf", action="store_true", help="transformers' decode path (generation.fast_decode: false)")
    a = ap.parse_args()
    cfg, model = build(a.rows, a.new, fast=not a.hf)
    ids, mask = prompts(model, a.rows, a.prompt_tokens)
    n_params = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" not in n) + sum(
        p.numel() for n, p in model.lm.named_parameters() if "lora_" in n)
    tied = model.lm.get_input_embeddings().weight.numel()  # read once as the LM head, not again as an embedding
    bytes_per_step = (n_params - tied + tied) * 4  # every weight once (the embedding rows read are negligible)
    timing = time_sample(model, cfg, ids, mask, a.reps)
    print(f"prefill {timing['prefill_s']:.3f} s, decode step {timing['decode_step_ms']:.1f} ms (median of {a.reps})", flush=True)

    from dynalm.models.generation import sample

    n_prof = 8
    gen_short = cfg.generation.model_copy(update={"max_new_tokens": n_prof + 1})
    gen_one = cfg.generation.model_copy(update={"max_new_tokens": 1})
    dec = profile(lambda: sample(model, ids, mask, gen_short, generator=torch.Generator().manual_seed(0)), "prefill + 8 decode steps")
    pre = profile(lambda: sample(model, ids, mask, gen_one, generator=torch.Generator().manual_seed(0)), "prefill alone")

    out_ids, attn, amask, *_ = sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(0))
    n_act = amask.shape[1]

    def update():
        model.zero_grad(set_to_none=True)
        fo = model(out_ids, attn, n_act)
        loss = -(fo.logprobs * amask).sum() / amask.sum() + 0.1 * (fo.values ** 2).mean()
        loss.backward()

    upd = profile(update, "update (forward + backward)")
    res = {
        "machine": machine(), "command": "python benchmarks/profile_decode.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "decode_path": "transformers" if a.hf else "fast", "rows": a.rows, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new,
        "weights_bytes_per_decode_step": bytes_per_step, **timing,
        "profiles": [dec, pre, upd],
    }
    write_result(a.name, res)
    for p in res["profiles"]:
        print(f"\n== {p['label']}: {p['wall_s_profiled']:.3f} s profiled, aten self {p['aten_self_s']:.3f} s, "
              f"{p['aten_calls']} op calls, unaccounted {100 * p['overhead_share']:.0f}%")
        for r in p["top_ops"]:
            print(f"  {r['op']:<40} {r['calls']:>6} {r['self_ms']:>9.1f} ms {100 * r['share_of_wall']:5.1f}%")


if __name__ == "__main__":
    main()
