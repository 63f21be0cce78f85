"""rollout.engine: vllm (issue 16, item 6) against a stand-in for vLLM's LLM and SamplingParams.

No CUDA machine has run the real engine; these tests hold dynalm's side of it: the folder
the engine loads, the merged weights synced after each update, the batch laid out as the
policy's own sampler lays it out, π_old recomputed by the training model, and the refusals.
The stand-in samples with transformers from the folder it is given, so its log-probs are
the training model's own up to float rounding.
"""

import copy
import sys
import types

import pytest
import torch

from dynalm.cli import main
from dynalm.config import build_config

from conftest import tiny_overrides


def _fake_vllm():
    from transformers import AutoModelForCausalLM

    mod = types.ModuleType("vllm")
    mod.instances = []

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class Runner:
        def __init__(self, folder):
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            self.model.loads = 0

            def load_weights(weights):
                state = self.model.state_dict()
                with torch.no_grad():
                    for name, t in weights:
                        state[name].copy_(t)  # a KeyError here is a name vLLM would not know either
                self.model.loads += 1

            self.model.load_weights = load_weights

    class LLM:
        def __init__(self, **kw):
            self.kw = kw
            torch.manual_seed(kw["seed"])  # as vLLM does when it starts
            runner = Runner(kw["model"])
            self.model = runner.model
            self.llm_engine = types.SimpleNamespace(model_executor=types.SimpleNamespace(
                driver_worker=types.SimpleNamespace(worker=types.SimpleNamespace(model_runner=runner))))
            self.resets, self.calls = 0, []
            mod.instances.append(self)

        def reset_prefix_cache(self):
            self.resets += 1
            return True

        @torch.no_grad()
        def generate(self, prompts, params, use_tqdm=True):
            outs = []
            for p, sp in zip(prompts, params):
                g = torch.Generator().manual_seed(sp.seed)
                ids, toks, lps = list(p["prompt_token_ids"]), [], []
                for _ in range(sp.max_tokens):
                    logits = self.model(torch.tensor([ids])).logits[0, -1] / sp.temperature
                    t = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
                    toks.append(t), lps.append({t: types.SimpleNamespace(logprob=float(torch.log_softmax(logits, -1)[t]))})
                    ids.append(t)
                    if t in sp.stop_token_ids and not sp.ignore_eos:
                        break
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=toks, logprobs=lps)]))
            self.calls.append(len(prompts))
            return outs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    return mod


@pytest.fixture()
def fake_vllm(monkeypatch):
    from dynalm.models.vllm_engine import VLLMEngine

    mod = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setattr(VLLMEngine, "_require_cuda", staticmethod(lambda policy: None))
    return mod


def _cfg(tiny_llama, prompts_file, **extra):
    over = tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                          rollout={"engine": "vllm"}, eval={"enabled": False}, **extra)
    over["model"]["max_prompt_tokens"] = 64  # prompt + completion within the tiny model's 256 positions
    return build_config(over)


def test_vllm_rollouts_train_with_merged_weights_synced_and_pi_old_recomputed(fake_vllm, tiny_llama, prompts_file):
    from dynalm.models.policy import PolicyValueModel
    from dynalm.rl.trainer import Trainer, seed_everything
    from dynalm.run import train_rows

    cfg = _cfg(tiny_llama, prompts_file, train={"steps": 2, "batch_size": 4, "learning_rate": 5e-2})
    assert cfg.rollout.is_cap == 2.0  # on by default with this engine (null = off with hf)
    seed_everything(cfg.seed)
    model = PolicyValueModel.from_config(cfg)
    trainer = Trainer(cfg, model, train_rows(cfg))
    llm = fake_vllm.instances[0]
    assert llm.kw["logprobs_mode"] == "processed_logprobs" and llm.kw["dtype"] == "bfloat16"
    assert llm.kw["max_model_len"] == cfg.model.max_prompt_tokens + cfg.generation.max_new_tokens

    def merged_state():
        return copy.deepcopy(model.lm).merge_and_unload(adapter_names=["default"]).state_dict()

    before = merged_state()
    r1 = trainer.step()
    b = r1.batch
    assert llm.calls == [4] and trainer.engine.syncs == 0  # the first rollout: the weights vLLM loaded at start
    # the engine's log-probs kept as the rollout's, π_old recomputed by the training model: the same
    # maths here (float32 on both sides), so they agree token by token: the columns line up
    assert b.rollout_logprobs is not None and b.rollout_logprobs.shape == b.logprobs.shape
    m = b.action_mask.bool()
    assert torch.allclose(b.rollout_logprobs[m], b.logprobs[m], atol=1e-5)
    assert (b.rollout_logprobs[~m] == 0).all() and (b.attention_mask[:, -b.action_mask.shape[1]:] == b.action_mask).all()
    assert 0 <= r1.metrics["rollout/logprob_gap_mean"] <= r1.metrics["rollout/logprob_gap_max"] < 1e-5
    assert any(not torch.equal(before[k], v) for k, v in merged_state().items())  # the update moved the policy
    trainer.step()
    assert trainer.engine.syncs == 1 and llm.resets == 1 and llm.model.loads == 1
    assert trainer.engine.sync() is True and trainer.engine.sync() is False  # only when the weights moved
    want = merged_state()
    got = llm.model.state_dict()
    assert set(got) == set(want)
    for k in want:  # every weight, adapted (W + s·B·A) or not, is the merged policy's
        assert torch.allclose(got[k], want[k], atol=1e-6), k


def test_vllm_sample_lays_out_the_batch_like_the_policy_sampler(fake_vllm, tiny_llama, prompts_file):
    from dynalm.models.generation import encode_prompts, stop_ids
    from dynalm.models.policy import PolicyValueModel
    from dynalm.models.vllm_engine import VLLMEngine

    cfg = _cfg(tiny_llama, prompts_file, generation={"max_new_tokens": 12})
    model = PolicyValueModel.from_config(cfg)
    eng = VLLMEngine(model, cfg.rollout, seed=0, max_model_len=64)
    texts = ["once the cat", "a big red dog sat on the"]
    ids, mask, _ = encode_prompts(model.tokenizer, texts, 32, model.device)
    out_ids, attn, amask, logp, values, ended = eng.sample(ids, mask, cfg.generation, torch.Generator().manual_seed(1))
    P = ids.shape[1]
    assert values is None and torch.equal(out_ids[:, :P], ids) and torch.equal(attn[:, :P], mask)
    stops = stop_ids(model.tokenizer)
    for i in range(2):
        n = int(amask[i].sum())
        assert amask[i, :n].all() and not amask[i, n:].any() and 1 <= n <= 12
        assert bool(ended[i]) == (int(out_ids[i, P + n - 1]) in stops)
        assert (logp[i, :n] < 0).all() and (logp[i, n:] == 0).all()
    again = eng.sample(ids, mask, cfg.generation, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], out_ids)  # per-row seeds from the trainer's generator: reproducible


def test_vllm_engine_keeps_the_run_rng_streams_and_refuses_too_long_rows(fake_vllm, tiny_llama, prompts_file):
    from dynalm.errors import UserError
    from dynalm.models.policy import PolicyValueModel
    from dynalm.models.vllm_engine import VLLMEngine

    cfg = _cfg(tiny_llama, prompts_file)
    model = PolicyValueModel.from_config(cfg)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    VLLMEngine(model, cfg.rollout, seed=7, max_model_len=64)  # the stand-in reseeds torch with 7, as vLLM does
    assert torch.equal(torch.rand(3), want)
    with pytest.raises(UserError) as e:
        VLLMEngine(model, cfg.rollout, seed=0, max_model_len=300)
    assert str(e.value) == ("rollout.engine vllm: model.max_prompt_tokens + generation.max_new_tokens = 300 exceeds "
                            "the model's 256 positions (lower either so that they fit)")


def test_vllm_engine_refusals(tiny_llama, prompts_file, tmp_path, capsys, monkeypatch):
    import yaml

    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    over = tiny_overrides(tiny_llama, prompts_file, rollout={"engine": "vllm"}, eval={"enabled": False})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dynalm: error: rollout.engine vllm needs vLLM, which is not installed "
        "(pip install 'dynalm[vllm]' on a CUDA machine, or set rollout.engine: hf)")
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm())  # installed, but this machine has no CUDA
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run2")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "dynalm: error: rollout.engine vllm runs on CUDA, and the policy is on cpu "
        "(set model.device: cuda on a CUDA machine, or rollout.engine: hf)")
    for sets, msg in ((["--set", "rollout.recompute_logprobs=false"], "set rollout.recompute_logprobs to null or true"),
                      (["--set", "generation.top_p=0.9"], "set generation.top_p: 1 and generation.top_k: 0"),
                      (["--set", "generation.top_k=50"], "set generation.top_p: 1 and generation.top_k: 0"),
                      (["--set", "generation.temperature=0.001"], "set generation.temperature to 0.01 or more"),
                      (["--set", "env.kind=dialog"], "multi-turn environments roll out with rollout.engine: hf")):
        assert main(["config", "--set", "rollout.engine=vllm", *sets]) == 2
        assert msg in capsys.readouterr().err
