"""TRL's side of benchmarks/perf.py: one timed GRPO (TRL 1.16) or PPO (TRL 1.12,
trl.experimental.ppo) run on the work the dynalm side does. Run with a TRL venv's python
(.bench/trl-VERSION/bin/python, built by perf.py); it never imports dynalm.

    python benchmarks/trl_side.py --algo grpo --work WORK.json --out RESULT.json

WORK.json (written by perf.py with dynalm's own loader and prompt renderer) holds the model
directory, the prompts of each step in dynalm's order, dynalm's token ids of the first prompts
(checked here, so both sides feed the model identical tokens) and the hyper-parameters.

Phases are timed by wrapping TRL's own functions (read from the installed source; see
`_time_grpo` / `_time_ppo`):
  generation  GRPO: GRPOTrainer._generate (tokenise, model.generate, decode);
              PPO: ppo_trainer.batch_generation (model.generate)
  reward      GRPO: GRPOTrainer._calculate_rewards; PPO: get_reward on the reward module
  reference   no-grad forwards besides generation: GRPO: _get_per_token_logps_and_entropies
              under no_grad (the reference log-probs, adapter off); PPO: the no-grad `forward`
              (reference log-probs) and get_reward on the value model (values)
  step        wall time between consecutive step ends (TrainerCallback.on_step_end)
The update is what is left of a step: step − generation − reward − reference.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path


def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


class Clock:
    """Per-step phase times, rewards and token counts."""

    def __init__(self):
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict] = []
        self.last_end: float | None = None

    def add(self, phase: str, dt: float) -> None:
        self.cur[phase] += dt

    def timed(self, phase: str, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(phase, time.perf_counter() - t)

        return wrapper

    def start(self) -> None:
        self.last_end = time.perf_counter()
        self.cur.clear()

    def end_step(self) -> None:
        now = time.perf_counter()
        rec = dict(self.cur)
        rec["step_s"] = now - self.last_end
        rec["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.steps.append(rec)
        self.last_end = now
        self.cur.clear()


def count_completion_tokens(ids, eos_id: int) -> int:
    """Tokens up to and including the first EOS (all of them when there is none), as dynalm counts."""
    import torch

    is_eos = ids == eos_id
    has = is_eos.any(-1)
    first = torch.where(has, is_eos.int().argmax(-1) + 1, torch.full_like(has, ids.shape[1], dtype=torch.long))
    return int(first.sum())


def callback(clock: Clock):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_end(self, args, state, control, **kw):
            clock.end_step()

    return StepClock()


def check_ids(tok, work: dict, render) -> None:
    """The first prompts must tokenise to exactly dynalm's ids."""
    for p in work["check"]:
        ours = render(p["text"])
        if ours != p["ids"]:
            raise SystemExit(f"prompt token ids differ from dynalm's for {p['text']!r}:\n  trl    {ours}\n  dynalm {p['ids']}")


def lora_config(work: dict):
    from peft import LoraConfig

    return LoraConfig(
        r=work["lora_r"], lora_alpha=work["lora_alpha"], lora_dropout=0.0, target_modules=work["lora_targets"],
        bias="none", task_type="CAUSAL_LM",
    )


# ----------------------------------------------------------------------------- GRPO


def run_grpo(work: dict, clock: Clock, outdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(work["model_dir"])
    check_ids(tok, work, lambda t: list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]))
    model = AutoModelForCausalLM.from_pretrained(work["model_dir"], dtype=torch.float32)
    an = vader()
    rewards: list[list[float]] = []

    def vader_compound(completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        r = [an.polarity_scores(t)["compound"] for t in texts]
        rewards.append(r)
        return r

    # one prompt per step, in dynalm's order; the sampler repeats it num_generations times
    rows = [{"prompt": [{"role": "user", "content": step[0]["text"]}]} for step in work["steps"]]
    g = work["grpo"]
    args = GRPOConfig(
        output_dir=str(outdir),
        per_device_train_batch_size=work["batch"],
        num_generations=g["num_generations"],
        gradient_accumulation_steps=1,
        num_iterations=1,  # one optimisation epoch per batch
        max_steps=len(rows),
        max_completion_length=work["max_new_tokens"],
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=work["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=g["beta"],
        epsilon=g["clip"],
        scale_rewards="group",
        shuffle_dataset=False,
        seed=work["seed"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,  # dynalm keeps activations too
        disable_dropout=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model, reward_funcs=[vader_compound], args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tok, peft_config=lora_config(work), callbacks=[callback(clock)],
    )
    tokens: list[dict] = []
    gen = trainer._generate

    def timed_generate(prompts):
        t = time.perf_counter()
        out = gen(prompts)
        clock.add("gen", time.perf_counter() - t)
        tokens.append({  # completion ids, EOS included, as dynalm counts
            "completion_tokens": sum(len(c) for c in out[1]),
            "rows": len(out[1]),
            "prompt_width": max(len(p) for p in out[0]),
            "decode_steps": max(len(c) for c in out[1]),
        })
        return out

    trainer._generate = timed_generate
    trainer._calculate_rewards = clock.timed("score", trainer._calculate_rewards)
    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*a, **k):
        if torch.is_grad_enabled():  # the update's forward
            return logps(*a, **k)
        t = time.perf_counter()
        try:
            return logps(*a, **k)
        finally:
            clock.add("ref", time.perf_counter() - t)

    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer.train()
    return {"rewards": rewards, "completion_tokens": tokens}


# ----------------------------------------------------------------------------- PPO


def reward_module(tok, an, log: list):
    """VADER as the reward *model* TRL's PPO expects: get_reward() calls
    `getattr(model, model.base_model_prefix)(input_ids=..., attention_mask=..., ...)` and then
    `model.score(hidden_states[-1])`, and reads the score at each row's last response token.
    The backbone decodes each row, takes the text after the last assistant header (the
    completion, cut at its first EOS) and returns its VADER compound at every position."""
    import torch
    from torch import nn
    from types import SimpleNamespace

    header = "<|im_start|>assistant\n"
    eos = tok.eos_token

    class VaderBackbone(nn.Module):
        def forward(self, input_ids, attention_mask, **kw):
            scores = []
            for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
                text = tok.decode([i for i, k in zip(ids, m) if k], skip_special_tokens=False)
                completion = text.rsplit(header, 1)[-1].split(eos, 1)[0].strip()
                scores.append(an.polarity_scores(completion)["compound"])
            log.append(scores)
            s = torch.tensor(scores, dtype=torch.float32)[:, None, None].expand(-1, input_ids.shape[1], 1)
            return SimpleNamespace(hidden_states=(s,))

    class VaderRewardModel(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = VaderBackbone()

        def score(self, hidden):
            return hidden

    return VaderRewardModel()


def run_ppo(work: dict, clock: Clock, outdir: Path) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(work["model_dir"], padding_side="left")
    # The chat template puts <|im_end|> (= EOS = this tokenizer's pad) inside every prompt, and
    # TRL's PPO derives attention masks from `ids != pad_token_id`: it needs a pad token that
    # never occurs in the text. <|endoftext|> (id 0) does not; TRL's example adds "[PAD]".
    tok.pad_token = "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id

    def encode(t):
        return list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])

    check_ids(tok, work, encode)
    policy = AutoModelForCausalLM.from_pretrained(work["model_dir"], dtype=torch.float32)
    # TRL's PPO needs a separate value model (a sequence-classification head on its own trunk,
    # fully trained); dynalm's ppo puts the value head on the policy's trunk.
    value = AutoModelForSequenceClassification.from_pretrained(work["model_dir"], num_labels=1, dtype=torch.float32)
    value.config.pad_token_id = tok.pad_token_id
    an = vader()
    rewards: list[list[float]] = []
    rm = reward_module(tok, an, rewards)

    rows = [{"input_ids": encode(p["text"])} for step in work["steps"] for p in step]
    ds = Dataset.from_list(rows)
    p = work["ppo"]
    args = PPOConfig(
        output_dir=str(outdir),
        per_device_train_batch_size=work["batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=1,  # one minibatch
        num_ppo_epochs=1,  # one optimisation epoch per batch
        local_rollout_forward_batch_size=work["batch"],
        total_episodes=len(rows),
        response_length=work["max_new_tokens"],
        stop_token="eos",
        temperature=1.0,
        learning_rate=work["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        kl_coef=p["kl_coef"],
        kl_estimator="k1",
        cliprange=p["clip"],
        cliprange_value=p["clip_value"],
        vf_coef=p["vf_coef"],
        gamma=1.0,
        lam=p["lam"],
        whiten_rewards=False,
        missing_eos_penalty=None,
        num_sample_generations=0,
        seed=work["seed"],
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
    )
    trainer = PPOTrainer(
        args=args, processing_class=tok, model=policy, ref_model=None, reward_model=rm, train_dataset=ds,
        value_model=value, eval_dataset=ds, peft_config=lora_config(work), callbacks=[callback(clock)],
    )
    # TRL's DataLoader shuffles; feed the prompts in dynalm's order instead (same batches of 8).
    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(ds, batch_size=work["batch"], shuffle=False, collate_fn=DataCollatorWithPadding(tok), drop_last=True)
    )

    tokens: list[dict] = []
    gen, fwd, getr = ppo_mod.batch_generation, ppo_mod.forward, ppo_mod.get_reward

    def timed_generation(model, queries, *a, **k):
        t = time.perf_counter()
        qr, logits = gen(model, queries, *a, **k)
        clock.add("gen", time.perf_counter() - t)
        tokens.append({
            "completion_tokens": count_completion_tokens(qr[:, queries.shape[1]:], tok.eos_token_id),
            "rows": int(queries.shape[0]),
            "prompt_width": int(queries.shape[1]),
            "decode_steps": int(qr.shape[1] - queries.shape[1]),
        })
        return qr, logits

    def timed_forward(*a, **k):
        if torch.is_grad_enabled():  # the update's forward
            return fwd(*a, **k)
        t = time.perf_counter()
        try:
            return fwd(*a, **k)
        finally:
            clock.add("ref", time.perf_counter() - t)

    def timed_get_reward(model, *a, **k):
        t = time.perf_counter()
        try:
            return getr(model, *a, **k)
        finally:
            clock.add("score" if model is rm else "ref", time.perf_counter() - t)

    ppo_mod.batch_generation, ppo_mod.forward, ppo_mod.get_reward = timed_generation, timed_forward, timed_get_reward
    trainer.train()
    return {"rewards": rewards, "completion_tokens": tokens}


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", choices=["grpo", "ppo"], required=True)
    ap.add_argument("--work", required=True, help="work description written by perf.py")
    ap.add_argument("--out", required=True, help="result JSON")
    a = ap.parse_args()
    work = json.loads(Path(a.work).read_text())

    import torch
    import transformers
    import trl

    torch.set_num_threads(work["threads"])
    torch.manual_seed(work["seed"])
    outdir = Path(a.out).with_suffix(".d")
    clock = Clock()
    t0 = time.perf_counter()
    res = (run_grpo if a.algo == "grpo" else run_ppo)(work, clock, outdir)
    wall = time.perf_counter() - t0
    steps = clock.steps
    if len(steps) != len(res["rewards"]) or len(steps) != len(res["completion_tokens"]):
        raise SystemExit(f"bookkeeping mismatch: {len(steps)} steps, {len(res['rewards'])} reward calls, "
                         f"{len(res['completion_tokens'])} generations")
    out = {
        "side": f"trl-{a.algo}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "peft": __import__("peft").__version__},
        "threads": torch.get_num_threads(),
        "wall_s": wall,
        "peak_rss_mb": max(s["rss_mb"] for s in steps),
        "steps": [
            {
                "step": i + 1,
                "step_s": s["step_s"],
                "generation_s": s.get("gen", 0.0),
                "reward_s": s.get("score", 0.0),
                "reference_s": s.get("ref", 0.0),
                "reward": sum(r) / len(r),
                **n,
                "rss_mb": s["rss_mb"],
            }
            for i, (s, r, n) in enumerate(zip(steps, res["rewards"], res["completion_tokens"]))
        ],
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"trl {a.algo}: {len(steps)} steps in {wall:.1f}s, peak RSS {out['peak_rss_mb']:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    main()
