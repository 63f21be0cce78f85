"""The critic choices (issue 14): where V(s) reads its features (head, a second adapter, a
model of its own), PopArt normalisation, the target choice and the critic-only warm-up."""

import json
import shutil

import pytest
import torch
import yaml

from dynalm.cli import main
from dynalm.config import build_config
from dynalm.data import read_rows
from dynalm.errors import UserError
from dynalm.models.critic import ValueNorm
from dynalm.models.generation import encode_prompts, sample
from dynalm.models.policy import PolicyValueModel
from dynalm.planning.config import PlannerConfig
from dynalm.planning.mcts import TokenMCTS
from dynalm.rl.batch import Batch
from dynalm.rl.objectives import _value_loss, add_advantages
from dynalm.rl.trainer import Trainer, seed_everything

from conftest import tiny_overrides


def _model(model_dir, prompts_file, **extra):
    cfg = build_config(tiny_overrides(model_dir, prompts_file, **extra))
    seed_everything(0)
    return cfg, PolicyValueModel.from_config(cfg)


def _nudge(model, which: str):
    """Move one adapter's LoRA B weights (`default` = the policy's, `critic` = the critic's)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and f".{which}." in n:
                p.add_(0.5 * torch.randn_like(p))


IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def test_adapter_critic_is_a_second_adapter_on_one_base(tiny_llama, prompts_file):
    cfg, m = _model(tiny_llama, prompts_file, model={"critic": "adapter"}, algorithm={"name": "ppo"})
    assert m.critic_kind == "adapter" and m.critic_lm is None and m.ref_lm is None  # one copy of the base
    value = {n for n, p in m.named_parameters() if any(p is q for q in m.value_parameters())}
    policy = {n for n, p in m.named_parameters() if any(p is q for q in m.policy_parameters())}
    assert value and policy and not value & policy
    assert all(".critic." in n for n in value if n != "value_head.weight" and n != "value_head.bias")
    assert all(".default." in n for n in policy)
    attn = torch.ones_like(IDS)
    m.eval()
    with torch.no_grad():
        lp0, v0 = m(IDS, attn, 3).logprobs, m.critic_values(IDS, attn, 3)
        _nudge(m, "critic")  # the critic's adapter moves: the policy does not
        lp1, v1 = m(IDS, attn, 3).logprobs, m.critic_values(IDS, attn, 3)
        _nudge(m, "default")  # the policy's adapter moves: the critic does not
        lp2, v2 = m(IDS, attn, 3).logprobs, m.critic_values(IDS, attn, 3)
        with m.reference() as ref:  # the reference = both adapters off = the base model
            base = m._run(ref, IDS, attn, 3, 1.0, False, False).logprobs
    assert torch.equal(lp0, lp1) and not torch.allclose(v0, v1)
    assert not torch.allclose(lp1, lp2) and torch.equal(v1, v2)
    assert torch.allclose(base, lp0, atol=1e-6)  # the nudges before did not leak into the reference
    assert all(p.requires_grad for p in m.value_parameters())  # peft's disable_adapter cleared them; restored


@pytest.mark.parametrize("critic", ["head", "adapter"])
def test_value_warmup_moves_only_the_critic(critic, tiny_llama, prompts_file):
    cfg, m = _model(tiny_llama, prompts_file, model={"critic": critic}, algorithm={"name": "ppo", "value_warmup_steps": 1},
                    rewards=[{"name": "length"}])
    trainer = Trainer(cfg, m, read_rows(str(prompts_file)))
    pol = [p.detach().clone() for p in m.policy_parameters()]
    val = [p.detach().clone() for p in m.value_parameters()]
    r1 = trainer.step()
    assert r1.metrics["value_warmup"] == 1.0 and r1.metrics["policy_loss"] == 0.0
    assert all(torch.equal(a, p) for a, p in zip(pol, m.policy_parameters())), "the policy moved during the warm-up"
    assert any(not torch.equal(a, p) for a, p in zip(val, m.value_parameters()))
    r2 = trainer.step()
    assert r2.metrics["value_warmup"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(pol, m.policy_parameters()))


def test_popart_keeps_every_value_and_tracks_the_targets_by_hand():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 1)
    vn = ValueNorm(decay=0.9)
    h = torch.randn(10, 4)
    before = vn(head(h).squeeze(-1)).detach()
    vn.update(2.0, 0.25, head)  # the first batch sets μ, σ²
    assert (float(vn.mean), float(vn.var)) == pytest.approx((2.0, 0.25))
    assert torch.allclose(vn(head(h).squeeze(-1)), before, atol=1e-5)
    vn.update(4.0, 1.0, head)
    mu = 0.9 * 2.0 + 0.1 * 4.0  # 2.2
    second = 0.9 * (0.25 + 2.0**2) + 0.1 * (1.0 + 4.0**2)  # 5.525
    assert float(vn.mean) == pytest.approx(mu) and float(vn.var) == pytest.approx(second - mu**2)
    assert torch.allclose(vn(head(h).squeeze(-1)), before, atol=1e-5)


def test_normalised_value_loss_is_the_error_in_sigmas(tiny_llama, prompts_file):
    cfg, m = _model(tiny_llama, prompts_file, algorithm={"name": "a2c", "value_norm": True})
    with torch.no_grad():
        m.value_norm.update(0.0, 4.0, m.value_head)  # σ = 2
    values, returns = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]])
    mb = Batch(IDS[:1, :3], torch.ones(1, 3), torch.ones(1, 2), torch.zeros(1, 2), values, ["p"], ["c"],
               torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))
    mb.returns = returns
    from dynalm.rl.algorithms import get

    vl, _ = _value_loss(m, values, mb, get("a2c"), cfg.algorithm, torch.ones(1, 2))
    assert float(vl) == pytest.approx(((2 / 2) ** 2 + 0) / 2)  # mean of ((R − V)/σ)²


def _batch(values):
    B = Batch(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4), torch.ones(1, 3), torch.zeros(1, 3),
              torch.tensor([values]), ["p"], ["c"], torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))
    B.rewards = torch.tensor([[0.0, 0.0, 1.0]])
    return B


@pytest.mark.parametrize("algo,adv,target,expect", [
    # δ = r + V' − V = (−0.3, −0.1, 0.9); GAE(λ=.5): A = (−0.125, 0.35, 0.9); λ-return A + V = (0.375, 0.55, 1.0)
    ("ppo", "gae", None, [0.375, 0.55, 1.0]),
    ("ppo", "gae", "mc", [1.0, 1.0, 1.0]),  # the Monte-Carlo return: the reward-to-go
    ("a2c", "td", None, [0.2, 0.1, 1.0]),  # TD(0): r + V(s')
    ("a2c", "td", "gae", [0.375, 0.55, 1.0]),
    ("grpo", None, None, [1.0, 1.0, 1.0]),  # the side critic: Monte-Carlo
    ("grpo", None, "gae", [0.375, 0.55, 1.0]),
])
def test_value_targets_by_hand(algo, adv, target, expect):
    a = {"name": algo, "lam": 0.5, "value_target": target, "whiten_advantages": False}
    if adv:
        a["advantage"] = adv
    if algo == "grpo":
        a["num_generations"] = 2
    cfg = build_config({"algorithm": a, "model": {"value_head": True}, "train": {"batch_size": 2}})
    b = _batch([0.5, 0.2, 0.1])
    add_advantages(b, 0.0, algorithm=cfg.algorithm, kl=cfg.kl)
    assert b.returns[0].tolist() == pytest.approx(expect)


def _reward_model_dir(model_dir, tmp_path):
    from dynalm.rewards.learned import RewardModel, RewardModelConfig, save_reward_model

    rm = RewardModel.build(RewardModelConfig(model=str(model_dir), data="unused.jsonl", device="cpu"))
    with torch.no_grad():
        rm.head.weight.normal_()
        rm.head.bias.fill_(0.3)
        for n, p in rm.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
    return rm, save_reward_model(rm, tmp_path / "rm")


def test_critic_model_starts_from_a_train_rm_reward_model(tiny_llama, prompts_file, tmp_path):
    rm, d = _reward_model_dir(tiny_llama, tmp_path)
    cfg, m = _model(tiny_llama, prompts_file, model={"critic": "model", "critic_init": str(d)}, algorithm={"name": "ppo"})
    assert m.critic_kind == "model" and m.critic_lm is not None
    attn = torch.ones_like(IDS)
    with torch.no_grad():
        v = m.state_values(IDS, attn)[:, -1]
        assert torch.allclose(v, rm(IDS, attn), atol=1e-5)  # V(finished text) = the reward model's score
    names = {n for n, p in m.named_parameters() if any(p is q for q in m.value_parameters())}
    assert any(n.startswith("critic_lm.") and "lora_" in n for n in names) and "value_head.weight" in names
    assert not any(n.startswith("critic_lm.") for n, p in m.named_parameters() if any(p is q for q in m.policy_parameters()))


def test_a_critic_model_with_another_tokenizer_is_refused(tiny_llama, prompts_file, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = tmp_path / "other"
    shutil.copytree(tiny_llama, other)
    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(40)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>").save_pretrained(other)
    cfg = tiny_overrides(tiny_llama, prompts_file, model={"critic": "model", "critic_model": str(other)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"dynalm: error: the critic model '{other}' has another tokenizer than the policy '{tiny_llama}' "
                   "(use a critic built on the policy's model family (it reads the policy's token ids))")


@pytest.mark.parametrize("over,msg", [
    ({"model": {"critic": "adapter", "lora": {"enabled": False}}, "algorithm": {"name": "ppo"}},
     "model.critic 'adapter' is a second LoRA adapter: it needs model.lora.enabled: true"),
    ({"model": {"critic": "adapter"}, "algorithm": {"name": "grpo", "num_generations": 2}},
     "model.critic 'adapter' needs a value head (set model.value_head: true, or use a2c/ppo)"),
    ({"model": {"critic_init": "rm"}, "algorithm": {"name": "ppo"}}, "model.critic_model and model.critic_init need model.critic: model"),
    ({"algorithm": {"name": "grpo", "num_generations": 2, "value_norm": True}},
     "algorithm.value_norm and value_warmup_steps train a critic: set model.value_head: true"),
])
def test_critic_settings_that_cannot_work_are_refused(over, msg):
    over = {"train": {"batch_size": 2}, **over}
    with pytest.raises(UserError) as e:
        build_config(over)
    assert str(e.value) == f"invalid config: {msg} (fix the config)"


def test_values_of_a_critic_with_its_own_trunk_in_sampling_and_search(tiny_llama, prompts_file):
    from dynalm.envs import TextEnv

    cfg, m = _model(tiny_llama, prompts_file, model={"critic": "adapter", "device": "cpu"}, algorithm={"name": "ppo"})
    _nudge(m, "critic")
    _nudge(m, "default")
    with torch.no_grad():
        m.value_head.weight.normal_()
    m.eval()
    ids, mask, _ = encode_prompts(m.tokenizer, ["the cat sat on", "once upon a time"], 64, "cpu")
    g = torch.Generator().manual_seed(0)
    out, attn, am, _, values, _ = sample(m, ids, mask, cfg.generation, generator=g)
    with torch.no_grad():
        expect = m.critic_values(out, attn, am.shape[1]) * am
    assert values.abs().sum() > 0 and torch.allclose(values, expect, atol=1e-6)
    env = TextEnv(cfg, m.tokenizer)
    row = {"prompt": "the cat sat on"}
    p_ids, _, _ = encode_prompts(m.tokenizer, [env.reset(row)], 64, "cpu")
    tree = TokenMCTS(m, env, row, p_ids, cfg.generation, PlannerConfig(name="mcts", simulations=3, top_k=2, leaf="value"))
    with torch.no_grad():
        assert tree.root.value == pytest.approx(float(m.state_values(p_ids, torch.ones_like(p_ids))[0, -1]), abs=1e-6)
    tree.simulate()  # the child's leaf value comes from the critic's own pass over prompt + token
    child = next(c for c in tree.root.children if c.visits)
    with torch.no_grad():
        full = torch.cat([p_ids, torch.tensor([[child.token]])], 1)
        v = float(m.state_values(full, torch.ones_like(full))[0, -1])
    assert child.value == pytest.approx(v + child.path_reward, abs=1e-5)  # the prompt's pass cached: PrefixCritic


@pytest.mark.parametrize("fixture,critic", [("tiny_llama", "adapter"), ("tiny_llama", "model"), ("tiny_gpt2", "model")])
def test_prefix_critic_caches_the_prefix_and_matches_a_full_pass(fixture, critic, request, prompts_file):
    """MCTS reads a separate critic through PrefixCritic: the prefix's pass cached, each path
    forwarded alone; every value equals state_values over the whole text."""
    from dynalm.models.critic import PrefixCritic

    cfg, m = _model(request.getfixturevalue(fixture), prompts_file, model={"critic": critic, "device": "cpu"},
                    algorithm={"name": "ppo", "value_norm": True})
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn_like(p))
        m.value_head.weight.normal_()
        m.value_norm.mean.fill_(0.7)
        m.value_norm.var.fill_(4.0)
    m.eval()
    seen = []
    trunk = m.lm if critic == "adapter" else m.critic_lm
    hook = trunk.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    pc = PrefixCritic(m)
    prompt = [5, 6, 7, 8, 9]
    calls = [(prompt, []), (prompt, [10]), (prompt, [11, 12, 13]), (prompt + [10], [14]), (prompt + [10, 14], []),
             (prompt + [10, 14], [3, 4]), ([5, 6, 20], [21])]  # the last one is no extension: the cache starts over
    got = [pc.value(pre, path) for pre, path in calls]
    hook.remove()
    with torch.no_grad():
        for v, (pre, path) in zip(got, calls):
            ids = torch.tensor([pre + path])
            assert v == pytest.approx(float(m.state_values(ids, torch.ones_like(ids))[0, -1]), rel=1e-5, abs=1e-5)
    assert seen == [5, 1, 3, 1, 1, 1, 2, 3, 1]  # only the tokens not in the cache are forwarded


def test_adapter_critic_with_popart_trains_resumes_and_exports(tiny_llama, prompts_file, tmp_path):
    from safetensors.torch import load_file

    from dynalm.trained import load_run

    cfg = tiny_overrides(tiny_llama, prompts_file, model={"critic": "adapter"},
                         algorithm={"name": "ppo", "value_norm": True, "value_warmup_steps": 1}, rewards=[{"name": "length"}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "-c", str(tmp_path / "c.yaml"), "--out", str(run)]) == 0
    rows = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["value_warmup"] for r in rows] == [1.0, 0.0]
    assert all(r["value_norm/std"] > 0 for r in rows)
    _, m = load_run(run)
    assert int(m.value_norm.steps) == 2  # the statistics came back from the checkpoint
    attn = torch.ones_like(IDS)
    with torch.no_grad():
        v = m.state_values(IDS, attn)
        vh = load_file(str(run / "export" / "value_head.safetensors"))
        h = m.critic_hidden(IDS, attn)
        folded = h @ vh["weight"].T + vh["bias"]  # the exported head has σ and μ folded in
    assert torch.allclose(folded.squeeze(-1), v, atol=1e-5)
    critic = load_file(str(run / "export" / "critic.safetensors"))
    assert critic and all(".critic." in k for k in critic)


def test_checkpointing_is_refused_with_an_adapter_critic(tiny_llama, prompts_file):
    # the backward's recompute of the critic's layers would run with the policy's adapter active
    with pytest.raises(UserError) as e:
        _model(tiny_llama, prompts_file, model={"critic": "adapter"}, algorithm={"name": "ppo"},
               train={"gradient_checkpointing": True})
    assert str(e.value) == ("train.gradient_checkpointing does not work with model.critic: adapter "
                            "(use model.critic: head or model, or set train.gradient_checkpointing: false)")
