"""Shared fixtures: tiny random-init models (Llama-like and GPT-2-like) with a word-level tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "yes no the a cat dog sat on mat once upon time king queen story forest river tree bird sun moon "
    "red blue green big small happy sad ran jumped saw and then"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_tiny_model(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    V = len(tok)
    torch.manual_seed(seed)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.3, **ids,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3, **ids)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(f'{{"prompt": "{w} the cat sat on"}}\n' for w in ["once", "a", "the", "big", "red", "small"]))
    return p


@pytest.fixture()
def yes_reward_file(tmp_path) -> Path:
    """A user's reward function in a file: share of words that are 'yes'."""
    p = tmp_path / "my_reward.py"
    p.write_text(
        "def yes_share(prompts, completions, **kwargs):\n"
        "    out = []\n"
        "    for c in completions:\n"
        "        w = c.split()\n"
        "        out.append(sum(x == 'yes' for x in w) / max(len(w), 1))\n"
        "    return out\n"
    )
    return p


def tiny_overrides(model_dir: Path, prompts: Path, **extra) -> dict:
    """A config dict for fast runs on a tiny model."""
    cfg = {
        "task": "tiny",
        "model": {"name": str(model_dir), "lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"train": str(prompts), "eval": str(prompts)},
        "generation": {"max_new_tokens": 6},
        "rewards": [{"name": "distinct1"}],
        "train": {"steps": 2, "batch_size": 4, "learning_rate": 1e-2},
        "log": {"progress": False, "tensorboard": False, "checkpoint_every": 1},
        "eval": {"batch_size": 8},
    }
    from dynalm.config import deep_merge

    return deep_merge(cfg, extra)
