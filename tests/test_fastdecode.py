"""The fast decode path (models/fastdecode.py): the same tokens, log-probs and values as
transformers' path and as a full forward of the training model, for the policy and the
reference, after an optimiser step, for Llama and Qwen2 (with q/k/v biases); GPT-2 keeps
transformers' path."""

from __future__ import annotations

import pytest
import torch

from dynalm.config import build_config
from dynalm.models.fastdecode import decoder_for, release, supports
from dynalm.models.generation import encode_prompts, sample
from dynalm.models.policy import PolicyValueModel
from dynalm.rl.trainer import seed_everything

from conftest import make_tokenizer, tiny_overrides

PROMPTS = ["the cat", "once upon a time there was a king", "red"]


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.3,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # make the q/k/v biases matter
        for layer in model.model.layers:
            for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                m.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _model(model_dir, prompts_file, fast: bool, **extra):
    cfg = build_config(tiny_overrides(model_dir, prompts_file, generation={"max_new_tokens": 10, "fast_decode": fast,
                                                                          "stop_at_eos": False}, **extra))
    seed_everything(0)
    model = PolicyValueModel.from_config(cfg)
    with torch.no_grad():
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        # values of the order of a reward (|V| ≲ 2): float32 rounding is relative, and the 1e-5 below is meant for that scale
        model.value_head.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    return cfg, model


def _sample(cfg, model, **kw):
    ids, mask, _ = encode_prompts(model.tokenizer, PROMPTS, 64, "cpu")
    return sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_fast_decode_equals_transformers_path_and_the_full_forward(fixture, request, prompts_file):
    model_dir = request.getfixturevalue(fixture)
    cfg_f, fast = _model(model_dir, prompts_file, True, model={"value_head": True})
    cfg_s, slow = _model(model_dir, prompts_file, False, model={"value_head": True})
    assert supports(fast.lm) is None
    a, b = _sample(cfg_f, fast), _sample(cfg_s, slow)
    assert decoder_for(fast, fast.lm)._layers  # the fast path ran
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])  # same tokens, same masks
    assert torch.allclose(a[3], b[3], atol=1e-5) and torch.allclose(a[4], b[4], atol=1e-5)
    out_ids, attn, amask, logp, values, _ = a
    full = fast(out_ids, attn, amask.shape[1])  # the training forward
    assert torch.allclose(full.logprobs * amask, logp, atol=1e-5)
    assert torch.allclose(full.values * amask, values, atol=1e-5)
    assert (logp != 0).sum() == amask.sum() == len(PROMPTS) * 10


def test_reference_decode_and_an_optimiser_step_are_followed(tiny_llama, prompts_file):
    cfg, model = _model(tiny_llama, prompts_file, True)
    ids, mask, _ = encode_prompts(model.tokenizer, PROMPTS, 64, "cpu")
    out = _sample(cfg, model, use_reference=True)  # the adapter off: the base model's log-probs
    assert torch.allclose(model.reference_logprobs(out[0], out[1], out[2].shape[1]) * out[2], out[3], atol=1e-5)
    before = _sample(cfg, model)
    opt = torch.optim.SGD(model.policy_parameters(), lr=0.5)  # an in-place update of the LoRA weights
    loss = -model(before[0], before[1], before[2].shape[1]).logprobs.sum()
    loss.backward()
    opt.step()
    after = _sample(cfg, model)
    full = model(after[0], after[1], after[2].shape[1])
    assert torch.allclose(full.logprobs * after[2], after[3], atol=1e-5)  # the folded weights were rebuilt
    assert not torch.allclose(before[3], after[3], atol=1e-3)


def test_models_it_does_not_know_keep_the_transformers_path(tiny_gpt2, prompts_file):
    cfg, model = _model(tiny_gpt2, prompts_file, True)
    assert supports(model.lm) == "model type gpt2" and decoder_for(model, model.lm) is None
    out_ids, attn, amask, logp, _values, _ = _sample(cfg, model)
    assert torch.allclose(model(out_ids, attn, amask.shape[1]).logprobs * amask, logp, atol=1e-5)


def test_shared_rows_finds_each_distinct_prompt():
    from dynalm.models.generation import _shared_rows

    ids = torch.tensor([[5, 6], [7, 8], [5, 6], [5, 6], [0, 8]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    first, inv = _shared_rows(ids, mask)
    assert torch.equal(ids[first][inv], ids) and torch.equal(mask[first][inv], mask)
    assert sorted(first.tolist()) == [0, 1, 4]  # the first row of each distinct prompt
    assert _shared_rows(ids[:2], mask[:2]) is None  # nothing repeats: one prefill per row
    # the same ids with a different mask (a pad token that is also a real token) are not shared
    assert _shared_rows(torch.tensor([[0, 8], [0, 8]]), torch.tensor([[0, 1], [1, 1]])) is None


@pytest.mark.parametrize("fast_path", [True, False])
def test_shared_prefixes_prefill_each_prompt_once_with_the_same_samples(tiny_llama, prompts_file, fast_path, monkeypatch):
    group = ["the cat", "the cat", "once upon a time there was a king", "the cat", "once upon a time there was a king"]
    prefill_rows = []
    real = PolicyValueModel.step_logits

    def spy(self, lm, input_ids, *a, **k):
        if input_ids.shape[1] > 1:
            prefill_rows.append(input_ids.shape[0])
        return real(self, lm, input_ids, *a, **k)

    monkeypatch.setattr(PolicyValueModel, "step_logits", spy)
    outs = []
    for share in (True, False):
        cfg, model = _model(tiny_llama, prompts_file, fast_path, model={"value_head": True})
        cfg.generation.share_prefixes = share
        ids, mask, _ = encode_prompts(model.tokenizer, group, 64, "cpu")
        outs.append(sample(model, ids, mask, cfg.generation, generator=torch.Generator().manual_seed(0)))
    assert prefill_rows == [2, 5]  # shared: the two distinct prompts; unshared: every row
    a, b = outs
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert torch.allclose(a[3], b[3], atol=1e-5) and torch.allclose(a[4], b[4], atol=1e-5)
    assert not torch.equal(a[0][0], a[0][1])  # rows of one prompt still sample their own tokens


def test_the_update_runs_without_the_folded_weights_and_the_next_sample_refolds(tiny_llama, prompts_file, monkeypatch):
    from dynalm.data import read_rows
    from dynalm.rl import trainer as trainer_mod

    cfg, model = _model(tiny_llama, prompts_file, True, train={"batch_size": 2})
    held = []
    real = trainer_mod.update

    def spy(m, *a, **k):
        held.append([bool(d._layers) for d in m.__dict__["_fast_decoders"].values() if d is not None])
        return real(m, *a, **k)

    monkeypatch.setattr(trainer_mod, "update", spy)
    t = trainer_mod.Trainer(cfg, model, read_rows(str(prompts_file)))
    t.step()
    t.step()
    assert held == [[False], [False]]  # the rollout had folded them; the update saw none
    dec = decoder_for(model, model.lm)
    out = _sample(cfg, model)
    assert dec._layers and torch.allclose(model(out[0], out[1], out[2].shape[1]).logprobs * out[2], out[3], atol=1e-5)
    # a step on released weights would run no layer at all: it refuses instead
    release(model)
    tok = torch.zeros(1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"FastDecoder.step needs folded weights: call refresh\(\) first"):
        dec.step(tok, tok, torch.ones(1, 1, dtype=torch.bool), [], 0)
