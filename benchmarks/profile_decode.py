"""Where a decode step and an update go: timings and a torch.profiler summary by operator.

    python benchmarks/profile_decode.py [--rows 8] [--new 48] [--prompt-tokens 60] [--group 4] [--name profile]

On the embedded SmolLM2-135M-Instruct with LoRA r=16 on q/k/v/o and a value head (ppo's
shape in `make bench`): times `dynalm.models.generation.sample` with EOS off (exactly
`--new` decode steps) split into prefill and per-decode-step time, against the
memory-bandwidth floor of reading every weight once per step; then profiles decode steps
and one update (forward + backward of the ppo loss's log-probs) with torch.profiler:
self CPU time per operator, and the share of wall time no operator accounts for (Python and
framework overhead). With `--group G` the rows come in groups of G identical prompts (a grpo
group's shape) and the prefill is timed with generation.share_prefixes on and off. Last, a
microbenchmark of the kernel that bounds decode: the model's 30 layers of weight shapes as
M-row float32 GEMMs (F.linear, as the decode step runs them, and the LM head as W·hᵀ) against a
plain read of the same bytes, each as GB/s. Writes benchmarks/results/NAME.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, median_seconds, write_result  # noqa: E402


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


def prompts(model, rows: int, width: int, group: int = 1):
    from dynalm.models.generation import encode_prompts, render_prompt

    words = ("the old lighthouse keeper watched the storm roll in from the sea and wondered whether the ship "
             "would make it past the rocks before nightfall ").split()
    texts = []
    for i in range(rows):
        body = " ".join(words[(i // group + j) % len(words)] for j in range(width))
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


def time_shared_prefill(model, cfg, ids, mask, reps: int) -> dict:
    """Prefill (a one-token sample) with share_prefixes on and off, interleaved, medians."""
    from dynalm.models.generation import sample

    times = {True: [], False: []}
    for r in range(reps):
        for share in (True, False):
            gen = cfg.generation.model_copy(update={"max_new_tokens": 1, "share_prefixes": share})
            t = time.perf_counter()
            sample(model, ids, mask, gen, generator=torch.Generator().manual_seed(r))
            times[share].append(time.perf_counter() - t)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"prefill_shared_s": on, "prefill_unshared_s": off, "prefill_speedup": off / on}


def gemm_bandwidth(model, rows: int, reps: int) -> dict:
    """GB/s of the decode step's weight reads as the kernels run them, against a plain read."""
    import torch.nn.functional as F

    c = model.lm.get_base_model().config if hasattr(model.lm, "get_base_model") else model.lm.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    h, inter, kv = c.hidden_size, c.intermediate_size, c.num_key_value_heads * hd
    shapes = [(h + 2 * kv, h), (h, h), (inter, h), (inter, h), (h, inter)] * c.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=g) * 0.02 for s in shapes]
    head = torch.randn((c.vocab_size, h), generator=g) * 0.02
    layer_bytes = sum(w.numel() for w in ws) * 4
    xs = {h: torch.randn(rows, h, generator=g), inter: torch.randn(rows, inter, generator=g)}

    def layers():
        for w in ws:
            F.linear(xs[w.shape[1]], w)

    def lm_head():
        torch.mm(head, xs[h].t())

    def read():
        for w in ws:
            w.sum()

    out = {"rows": rows, "layer_weights_bytes": layer_bytes, "lm_head_bytes": head.numel() * 4}
    for name, fn, nbytes in (("linear_layers", layers, layer_bytes), ("lm_head_mm", lm_head, head.numel() * 4),
                             ("plain_read", read, layer_bytes)):
        med = median_seconds(fn, reps)
        out[name] = {"ms": round(1e3 * med, 2), "gb_per_s": round(nbytes / med / 1e9, 2)}
    return out


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
    ap.add_argument("--group", type=int, default=1, help="rows per distinct prompt (grpo's group); >1 also times shared prefill")
    ap.add_argument("--name", default="profile")
    ap.add_argument("--hf", action="store_true", help="transformers' decode path (generation.fast_decode: false)")
    a = ap.parse_args()
    cfg, model = build(a.rows, a.new, fast=not a.hf)
    ids, mask = prompts(model, a.rows, a.prompt_tokens, a.group)
    n_params = sum(p.numel() for n, p in model.lm.named_parameters() if "lora_" not in n) + sum(
        p.numel() for n, p in model.lm.named_parameters() if "lora_" in n)
    tied = model.lm.get_input_embeddings().weight.numel()  # read once as the LM head, not again as an embedding
    bytes_per_step = (n_params - tied + tied) * 4  # every weight once (the embedding rows read are negligible)
    timing = time_sample(model, cfg, ids, mask, a.reps)
    print(f"prefill {timing['prefill_s']:.3f} s, decode step {timing['decode_step_ms']:.1f} ms (median of {a.reps})", flush=True)
    if a.group > 1:
        timing.update(time_shared_prefill(model, cfg, ids, mask, a.reps))
        print(f"prefill shared {timing['prefill_shared_s']:.3f} s, unshared {timing['prefill_unshared_s']:.3f} s "
              f"({timing['prefill_speedup']:.2f}x)", flush=True)

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
        "profiles": [dec, pre, upd], "group": a.group,
        "gemm": gemm_bandwidth(model, a.rows, a.reps),
    }
    write_result(a.name, res)
    gm = res["gemm"]
    print(f"\nGEMMs of the decode step ({a.rows} rows): layers {gm['linear_layers']['gb_per_s']} GB/s, LM head "
          f"{gm['lm_head_mm']['gb_per_s']} GB/s; a plain read of the layers' weights {gm['plain_read']['gb_per_s']} GB/s")
    for p in res["profiles"]:
        print(f"\n== {p['label']}: {p['wall_s_profiled']:.3f} s profiled, aten self {p['aten_self_s']:.3f} s, "
              f"{p['aten_calls']} op calls, unaccounted {100 * p['overhead_share']:.0f}%")
        for r in p["top_ops"]:
            print(f"  {r['op']:<40} {r['calls']:>6} {r['self_ms']:>9.1f} ms {100 * r['share_of_wall']:5.1f}%")


if __name__ == "__main__":
    main()
