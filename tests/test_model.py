"""Policy + value model: reference log-probs, KV-cache sampling, padding, parameter updates."""

import pytest
import torch

from dynalm.config import build_config
from dynalm.envs import TextEnv
from dynalm.models.policy import PolicyValueModel
from dynalm.models.generation import encode_prompts, sample
from dynalm.rl.episodes import rollout
from dynalm.rl.trainer import Trainer, recompute_logprobs, seed_everything, wants_recompute

from conftest import tiny_overrides


def _model(model_dir, prompts_file, **extra):
    cfg = build_config(tiny_overrides(model_dir, prompts_file, **extra))
    seed_everything(0)
    return cfg, PolicyValueModel.from_config(cfg)


def _perturb_lora(model):
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_reference_logprobs_equal_base_model(fixture, request, prompts_file):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(fixture)
    cfg, model = _model(model_dir, prompts_file)
    _perturb_lora(model)  # the adapter now changes the policy ...
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = model.tokenizer
    ids, mask, _ = encode_prompts(tok, ["the cat sat on the mat", "once upon a time"], 64, "cpu")
    T = 3
    ref = model.reference_logprobs(ids, mask, T)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    expect = torch.log_softmax(logits[:, -T - 1 : -1], -1).gather(-1, ids[:, -T:, None]).squeeze(-1)
    assert torch.allclose(ref, expect, atol=1e-5)  # ... but the reference is the base model
    pol = model(ids, mask, T).logprobs
    assert not torch.allclose(pol, expect, atol=1e-3)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_kv_cache_sampling_matches_full_forward(fixture, request, prompts_file):
    """Log-probs and values recorded while sampling (KV cache, left padding) equal a full forward."""
    cfg, model = _model(request.getfixturevalue(fixture), prompts_file)
    _perturb_lora(model)
    with torch.no_grad():
        model.value_head.weight.normal_()
    ids, mask, _ = encode_prompts(model.tokenizer, ["the cat", "once upon a time there was a king"], 64, "cpu")
    g = torch.Generator().manual_seed(0)
    out_ids, attn, amask, logp, values, ended = sample(model, ids, mask, cfg.generation, generator=g)
    full = model(out_ids, attn, amask.shape[1])
    assert torch.allclose(full.logprobs * amask, logp, atol=1e-5)
    assert torch.allclose(full.values * amask, values, atol=1e-5)


def test_left_padding_does_not_change_logprobs(tiny_llama, prompts_file):
    cfg, model = _model(tiny_llama, prompts_file)
    tok = model.tokenizer
    short = "the cat sat"
    ids1, m1, _ = encode_prompts(tok, [short], 64, "cpu")
    ids2, m2, _ = encode_prompts(tok, [short, "once upon a time there was a big red dog"], 64, "cpu")
    a = model(ids1, m1, 2).logprobs[0]
    b = model(ids2, m2, 2).logprobs[0]
    assert torch.allclose(a, b, atol=1e-5)


def test_top_k_one_is_greedy(tiny_llama, prompts_file):
    cfg, model = _model(tiny_llama, prompts_file, generation={"top_k": 1, "max_new_tokens": 5, "stop_at_eos": False})
    ids, mask, _ = encode_prompts(model.tokenizer, ["the cat", "a dog"], 64, "cpu")
    a = sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(1))[0]
    b = sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(2))[0]
    c = sample(model, ids, mask, cfg.generation, greedy=True)[0]
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("algo", ["a2c", "ppo", "grpo", "rloo"])
@pytest.mark.parametrize("lora", [True, False])
def test_update_changes_trainable_and_not_frozen(algo, lora, tiny_llama, prompts_file):
    extra = {"algorithm": {"name": algo, "num_generations": 2 if algo in ("grpo", "rloo") else 1}}
    extra["model"] = {"lora": {"enabled": lora}}
    extra["rewards"] = [{"name": "length"}]  # varies across completions, so group advantages are non-zero
    cfg, model = _model(tiny_llama, prompts_file, **extra)
    from dynalm.data import read_rows

    trainer = Trainer(cfg, model, read_rows(str(prompts_file)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = set(before) - trainable
    assert changed, "no parameter changed"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    if lora:
        assert all("lora_" in n or n.startswith("value_head") for n in trainable)
        assert any("lora_B" in n for n in changed)
    else:
        assert model.ref_lm is not None and all(not p.requires_grad for p in model.ref_lm.parameters())
        assert not any(n.startswith("ref_lm") for n in changed)
    has_head = algo in ("a2c", "ppo")
    assert (model.value_head is not None) == has_head
    if has_head:
        assert "value_head.weight" in changed
    assert frozen  # LoRA: base weights; full FT: the reference copy


def test_critic_free_side_value_head_learns_monte_carlo_return(tiny_llama, prompts_file):
    """grpo with model.value_head: true trains V on the Monte-Carlo return (for planning)."""
    from dynalm.data import read_rows

    cfg, model = _model(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                        model={"value_head": True}, rewards=[{"name": "length"}], kl={"coef": 0.0})
    trainer = Trainer(cfg, model, read_rows(str(prompts_file)))
    before = model.value_head.weight.detach().clone()
    res = trainer.step()
    b = res.batch
    # returns = reward-to-go (γ = 1): the score at the last token, so every valid position holds the score
    expect = b.scores[:, None] * b.action_mask
    assert torch.allclose(b.returns, expect, atol=1e-6)
    assert not torch.equal(before, model.value_head.weight)
    assert res.metrics["value_loss"] > 0 and "explained_variance" in res.metrics


def test_side_value_head_leaves_the_policy_update_unchanged(tiny_llama, prompts_file):
    """grpo with a (detached) side critic trains the policy exactly as grpo without one."""
    from dynalm.data import read_rows

    out = []
    for head in (False, True):
        cfg, model = _model(tiny_llama, prompts_file, algorithm={"name": "grpo", "num_generations": 2},
                            model={"value_head": head}, rewards=[{"name": "length"}])
        trainer = Trainer(cfg, model, read_rows(str(prompts_file)))
        ms = [trainer.step().metrics for _ in range(2)]
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        out.append((ms, lora))
    (m0, w0), (m1, w1) = out
    assert [m["reward"] for m in m0] == [m["reward"] for m in m1]
    assert [m["kl"] for m in m0] == [m["kl"] for m in m1]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_bf16_first_ratio_is_one_when_logprobs_are_recomputed(tiny_llama, prompts_file):
    """Issue 12.9, on a CPU under bf16 autocast: the KV-cache decode's log-probs differ from the
    training forward's (other kernels, bf16 rounding), so PPO's first ratio is not 1; with
    rollout.recompute_logprobs π_old comes from a no-grad training forward and it is 1."""
    seed_everything(0)
    cfg = build_config(tiny_overrides(tiny_llama, prompts_file, algorithm={"name": "ppo"}, generation={"max_new_tokens": 8},
                                      rollout={"recompute_logprobs": True}))
    model = PolicyValueModel.from_config(cfg)
    with torch.no_grad():  # a policy away from the reference, so the logits are not tiny
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
    model.amp_dtype = torch.bfloat16
    assert wants_recompute(cfg.rollout, model)
    rows = [{"prompt": "the cat sat"}, {"prompt": "once upon a time there"}]
    env = TextEnv(cfg, model.tokenizer)
    batch, _, _ = rollout(model, env, rows, [0, 1], cfg.generation, max_prompt_tokens=64, generator=torch.Generator().manual_seed(0))
    m = batch.action_mask

    def max_ratio_gap():
        model.train()
        out = model(batch.input_ids, batch.attention_mask, n_actions=batch.n_actions)
        return float(((torch.exp(out.logprobs - batch.logprobs) - 1).abs() * m).max())

    assert max_ratio_gap() > 1e-4  # the problem: decode and training forward disagree under bf16
    recompute_logprobs(model, batch, cfg.generation.temperature)
    assert max_ratio_gap() < 1e-6
    # the LM head ran on a float32 hidden state: logits are float32 even under autocast
    ids = batch.input_ids[:1]
    with model.autocast():
        logits = model.lm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.float32
    # off by default on a CPU, on on CUDA
    assert not wants_recompute(build_config(tiny_overrides(tiny_llama, prompts_file)).rollout, model)


def test_gradient_checkpointing_recomputes_layers_and_takes_the_same_step(tiny_llama, prompts_file, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaMLP

    from dynalm.data import read_rows
    from dynalm.memory import model_memory_estimate

    calls = []
    real = LlamaMLP.forward

    def counted(self, x):  # the recompute runs forward itself, without module hooks
        calls.append(self.training and torch.is_grad_enabled())
        return real(self, x)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    after, mlp_calls, est = {}, {}, {}
    for ckpt in (False, True):
        cfg, model = _model(tiny_llama, prompts_file, algorithm={"name": "ppo"}, rewards=[{"name": "length"}],
                            train={"gradient_checkpointing": ckpt})
        _perturb_lora(model)
        calls.clear()
        Trainer(cfg, model, read_rows(str(prompts_file))).step()
        after[ckpt] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        mlp_calls[ckpt] = sum(calls)  # MLP forwards with gradients on: the update's
        est[ckpt] = model_memory_estimate(model, cfg)["activations"]
    # without checkpointing the update runs each layer's MLP once; with it, the backward runs it again
    assert mlp_calls[True] == 2 * mlp_calls[False] > 0
    assert after[True].keys() == after[False].keys()
    for n in after[False]:
        assert torch.allclose(after[True][n], after[False][n], atol=1e-6), n
    layers = 2  # the tiny model's; per token and hidden unit: layers + one layer's 20 values vs layers × 20
    assert est[True] * layers * 20 == est[False] * (layers + 20)
