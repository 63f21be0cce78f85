"""Training rollouts sampled by vLLM (`rollout.engine: vllm`), colocated with the trainer.

TRL's and veRL's way on GPUs: a vLLM engine in the training process, on the same device,
holds its own copy of the policy's weights and samples the rollouts; the trainer keeps
transformers for everything else. dynalm's side of it:

* at start the policy is written (LoRA merged) as a transformers folder that vLLM loads;
* before each rollout, when the policy's weights moved since the last one (their version
  counters), the merged weights of every trained projection (W + s·B·A) are loaded into the
  engine's model in place and its prefix cache is reset;
* prompts go in as token ids (the trainer's own tokenisation and truncation), each row with
  its own seed drawn from the trainer's generator, so a run is reproducible on one engine
  build; the sampler's per-token log-probs come back after temperature
  (`logprobs_mode="processed_logprobs"`, vLLM ≥ 0.10.2), which is what the policy's
  log-probs are. vLLM's processed log-probs are also after top-k/top-p truncation, where
  dynalm's own sampler reports the untruncated ones, so the engine is refused with
  generation.top_p < 1 or top_k > 0 (the two engines would weight the same tokens
  differently);
* the batch is laid out exactly as `generation.sample` lays it out (left-padded prompt,
  completion columns, the stop token kept and counted, `ended` where it was sampled), and
  the trainer then recomputes π_old (and V_old) with the training model and weights each
  token by min(π_old/π_vllm, rollout.is_cap) (`rl/update.recompute_logprobs`, `rl/losses`).

vLLM is an optional extra (`pip install 'dynalm[vllm]'`) and needs CUDA; without either,
`rollout.engine: vllm` is refused in one line. Tested against a stand-in for vLLM's
`LLM`/`SamplingParams` (tests/test_vllm_engine.py); no CUDA machine has run it yet.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np

import torch

from ..errors import UserError
from .generation import assemble_completions, stop_ids

INSTALL = "pip install 'dynalm[vllm]' on a CUDA machine, or set rollout.engine: hf"


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise UserError("rollout.engine vllm needs vLLM, which is not installed", INSTALL) from None
    return vllm


class VLLMEngine:
    def __init__(self, policy, rollout, *, seed: int, max_model_len: int):
        vllm = _import_vllm()
        self._require_cuda(policy)
        self.policy, self.vllm = policy, vllm
        longest = getattr(policy.lm.config.get_text_config(), "max_position_embeddings", None)
        if longest is not None and max_model_len > longest:
            raise UserError(f"rollout.engine vllm: model.max_prompt_tokens + generation.max_new_tokens = {max_model_len} "
                            f"exceeds the model's {longest} positions", "lower either so that they fit")
        self.folder = tempfile.TemporaryDirectory(prefix="dynalm-vllm-")
        policy.save_merged_lm(self.folder.name)
        # in this process (TRL's colocate mode), so that the engine's model object is reachable for weight loads
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # vLLM seeds the global RNGs with its own seed when it starts: keep the run's streams as they were
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            self.llm = vllm.LLM(
                model=self.folder.name, tokenizer=self.folder.name, dtype=rollout.vllm_dtype, seed=seed,
                gpu_memory_utilization=rollout.vllm_gpu_memory_utilization, max_model_len=max_model_len,
                max_num_batched_tokens=max(4096, max_model_len),  # TRL's setting; the KV-cache profile fits a small share
                enable_prefix_caching=True, logprobs_mode="processed_logprobs",
            )
        finally:
            random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)
        self._versions = self._weight_versions()
        self.syncs = 0

    @classmethod
    def for_run(cls, cfg, policy, *, distributed: bool) -> "VLLMEngine":
        """The engine a run's config asks for (rollout.engine: vllm), seeded with the run."""
        if distributed:
            raise UserError("rollout.engine vllm is colocated with one training process", "run it without accelerate launch")
        return cls(policy, cfg.rollout, seed=cfg.seed, max_model_len=cfg.model.max_prompt_tokens + cfg.generation.max_new_tokens)

    @staticmethod
    def _require_cuda(policy) -> None:
        if policy.device.type != "cuda":
            raise UserError(f"rollout.engine vllm runs on CUDA, and the policy is on {policy.device.type}",
                            "set model.device: cuda on a CUDA machine, or rollout.engine: hf")

    # ------------------------------------------------------------------ weights
    def _weight_versions(self) -> tuple[int, ...]:
        # in-place updates bump a tensor's version (the update's AdamW is built with fused=False for
        # this: fused kernels do not bump it; the fast decoder relies on the same counters)
        return tuple(p._version for p in self.policy.policy_parameters())

    def _engine_model(self):
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.worker.model_runner.model",  # vLLM V1 in process (and V0)
                     "model_executor.driver_worker.model_runner.model",  # older V0 builds (TRL reads this one)
                     "engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model"):
            obj = engine
            try:
                for part in path.split("."):
                    obj = getattr(obj, part)
                return obj
            except AttributeError:
                continue
        raise RuntimeError("dynalm: this vLLM build does not expose its model in process: weights cannot be synced")

    def sync(self) -> bool:
        """Load the policy's merged weights into the engine when they changed. True if it loaded."""
        now = self._weight_versions()
        if now == self._versions:
            return False
        self._engine_model().load_weights(self.policy.merged_weights())
        if self.llm.reset_prefix_cache() is False:  # newer builds say whether it reset; older ones return None
            raise RuntimeError("dynalm: vLLM did not reset its prefix cache after a weight sync")
        self._versions = now
        self.syncs += 1
        return True

    # ------------------------------------------------------------------ sampling
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, gen, generator: torch.Generator | None = None):
        """`generation.sample`'s six results for these left-padded prompts; values are None
        (the trainer's recompute reads them off the training model)."""
        self.sync()
        tok = self.policy.tokenizer
        stops = sorted(stop_ids(tok, getattr(self.policy.lm, "generation_config", None))) if gen.stop_at_eos else []
        B, dev = prompt_ids.shape[0], prompt_ids.device
        seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator, device=generator.device if generator else "cpu").tolist()
        prompts = [{"prompt_token_ids": prompt_ids[i, prompt_mask[i].bool()].tolist()} for i in range(B)]
        params = [self.vllm.SamplingParams(
            n=1, temperature=gen.temperature, max_tokens=gen.max_new_tokens,  # top-p/top-k off (schema)
            logprobs=0, seed=s, stop_token_ids=stops, ignore_eos=not gen.stop_at_eos, skip_special_tokens=True,
        ) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        toks, lps = [], []
        for o in outs:
            c = o.outputs[0]
            toks.append(list(c.token_ids))
            lps.append([float(step[t].logprob) for step, t in zip(c.logprobs, c.token_ids)])
        T = max((len(t) for t in toks), default=0)
        ids, attn, amask, logp = assemble_completions(prompt_ids, prompt_mask, toks, T, tok)
        for i, lp in enumerate(lps):
            logp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        ended = torch.tensor([bool(t) and t[-1] in stops for t in toks], dtype=torch.bool, device=dev)
        return ids, attn, amask, logp, None, ended
