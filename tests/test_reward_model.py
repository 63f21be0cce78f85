"""Learned reward model: losses, last-real-token pooling, training, save/load, data errors, online refit."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from dynalm.errors import UserError
from dynalm.rewards.learned import (
    META_FILE,
    WEIGHTS_FILE,
    RewardModel,
    RewardModelConfig,
    bradley_terry_loss,
    learned_reward,
    load_reward_model,
    regression_loss,
    resolve_learned,
)
from dynalm.rewards.rm_training import (
    evaluate_reward_model,
    pairwise_accuracy,
    pearson,
    prefix_rows,
    read_reward_rows,
    split_rows,
    train_reward_model,
)

from conftest import WORDS

FILLER = [w for w in WORDS if w not in ("yes", "no")]


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen and rejected differ in one word: 'yes' in the chosen one, 'no' in the rejected one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        base = rng.sample(FILLER, 3)
        k = rng.randrange(4)
        rows.append(
            {
                "prompt": " ".join(rng.sample(FILLER, 4)),
                "chosen": " ".join(base[:k] + ["yes"] + base[k:]),
                "rejected": " ".join(base[:k] + ["no"] + base[k:]),
            }
        )
    return rows


def _rated(n: int, seed: int = 0) -> list[dict]:
    """Completions of four words, each 'yes' or 'no'; the reward is the number of 'yes'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(["yes", "no"]) for _ in range(4)]
        rows.append(
            {"prompt": " ".join(rng.sample(FILLER, 4)), "completion": " ".join(words), "reward": float(words.count("yes"))}
        )
    return rows


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(model_dir, data="unused.jsonl", **kw) -> RewardModelConfig:
    base = dict(model=str(model_dir), data=str(data), lora_r=4, lora_alpha=8, max_tokens=32, device="cpu")
    return RewardModelConfig(**{**base, **kw})


# ---------------------------------------------------------------------------- losses and metrics
def test_bradley_terry_loss_hand_values():
    # −log σ(2) = log(1 + e^−2) = 0.126928, −log σ(0) = log 2 = 0.693147; mean 0.410038
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx(0.4100378, abs=1e-6)
    # only the margin matters
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([3.0])).item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)
    # a huge wrong margin stays finite: ≈ the margin itself
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0, rel=1e-6)


def test_regression_loss_hand_values():
    # ((1−1)² + (2−0)² + (3−5)²) / 3 = 8/3
    loss = regression_loss(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0.0, 5.0]))
    assert loss.item() == pytest.approx(8 / 3, abs=1e-6)


def test_metrics_hand_values():
    assert pairwise_accuracy([1.0, 2.0, 0.0, 1.0], [0.0, 3.0, -1.0, 1.0]) == pytest.approx(2.5 / 4)
    assert pearson([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(1.0)
    assert pearson([1.0, 2.0, 3.0], [3.0, 1.0, 2.0]) == pytest.approx(-0.5)
    assert pearson([1.0, 1.0], [0.0, 1.0]) is None


# ---------------------------------------------------------------------------- config
def test_config_rejects_unknown_keys_and_bad_templates():
    with pytest.raises(ValidationError):
        RewardModelConfig(data="x.jsonl", lr=0.1)
    with pytest.raises(ValidationError, match="only use"):
        RewardModelConfig(data="x.jsonl", template="{prompt} {title}")
    assert all(f.description for f in RewardModelConfig.model_fields.values())


# ---------------------------------------------------------------------------- pooling
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_last_real_token_pooling_ignores_left_padding(fixture, request):
    model = RewardModel.build(_cfg(request.getfixturevalue(fixture)))
    with torch.no_grad():  # a non-trivial adapter, so LoRA is part of what is compared
        for n, p in model.lm.named_parameters():
            if "lora_B" in n:
                p.add_(0.3 * torch.randn_like(p))
    # the pad id is a real token of the texts: padding must come from the mask alone
    model.tokenizer.pad_token = "yes"
    short = ("the cat", "sat yes")
    long = ("once upon a time the king and queen saw a big red bird", "then the bird ran yes yes")
    alone = model.score([short[0]], [short[1]])[0]
    batched = model.score([short[0], long[0]], [short[1], long[1]])
    assert len(batched) == 2
    assert batched[0] == pytest.approx(alone, abs=1e-5)
    assert batched[1] == pytest.approx(model.score([long[0]], [long[1]])[0], abs=1e-5)

    # right padding gives the same reward too: the pooled position is read from the mask
    ids, mask = model.encode([short[0], long[0]], [short[1], long[1]])
    n_real = int(mask[0].sum())
    right_ids = torch.full_like(ids[:1], model.tokenizer.pad_token_id)
    right_mask = torch.zeros_like(mask[:1])
    right_ids[0, :n_real] = ids[0, -n_real:]
    right_mask[0, :n_real] = 1
    with torch.no_grad():
        assert model(right_ids, right_mask).item() == pytest.approx(alone, abs=1e-5)


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def trained_pairs(tiny_llama, tmp_path_factory):
    """A LoRA reward model trained on the yes/no pairs, shared by the tests below."""
    root = tmp_path_factory.mktemp("rm-pairs")
    data = _write_jsonl(root / "pairs.jsonl", _pairs(96))
    cfg = _cfg(tiny_llama, data, learning_rate=1e-2, epochs=5, eval_fraction=0.25, batch_size=8)
    lines: list[str] = []
    metrics = train_reward_model(cfg, root / "rm", echo=lines.append)
    return root / "rm", cfg, metrics, lines


def test_pairs_training_reaches_heldout_accuracy(trained_pairs):
    out, cfg, metrics, lines = trained_pairs
    assert metrics["kind"] == "pairs"
    assert (metrics["train_rows"], metrics["eval_rows"], metrics["eval_on"]) == (72, 24, "heldout")
    assert metrics["steps"] == 5 * 9
    assert metrics["after"]["accuracy"] >= 0.9
    assert metrics["after"]["loss"] < metrics["before"]["loss"]
    assert any("before training" in s for s in lines) and any("after training" in s for s in lines)

    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", META_FILE, WEIGHTS_FILE]  # manifest: issue 19
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left
    meta = json.loads((out / META_FILE).read_text())
    assert meta["metrics"] == metrics
    assert RewardModelConfig.model_validate(meta["config"]) == cfg

    from safetensors.torch import load_file

    names = set(load_file(str(out / WEIGHTS_FILE)))
    assert {"head.weight", "head.bias"} <= names
    assert names - {"head.weight", "head.bias"} and all("lora_" in n for n in names - {"head.weight", "head.bias"})


def test_regression_training_correlates(tiny_gpt2, tmp_path):
    data = _write_jsonl(tmp_path / "rated.jsonl", _rated(200))
    cfg = _cfg(tiny_gpt2, data, lora=False, learning_rate=3e-3, epochs=5, eval_fraction=0.25)
    metrics = train_reward_model(cfg, tmp_path / "rm", echo=lambda s: None)
    assert metrics["kind"] == "regression"
    assert metrics["after"]["pearson"] > 0.8
    assert metrics["after"]["mse"] < metrics["before"]["mse"]
    # full fine-tuning saves the whole trunk, and it loads back to the same scores
    model = load_reward_model(tmp_path / "rm")
    rows = _rated(5, seed=1)
    again = load_reward_model(tmp_path / "rm" / META_FILE)
    p, c = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    assert model.score(p, c) == again.score(p, c)


def test_prefix_rows_cut_each_completion_at_its_tokens(tiny_gpt2):
    tok = RewardModel.build(_cfg(tiny_gpt2)).tokenizer
    rows = _rated(6) + [{"prompt": "p q", "completion": "", "reward": 0.5}]
    out = prefix_rows(rows, tok, 3, seed=0)
    assert len(out) == 3 * len(rows)
    for i, r in enumerate(rows):
        full = tok(r["completion"], add_special_tokens=False)["input_ids"]
        for x in out[3 * i : 3 * i + 3]:
            assert x["prompt"] == r["prompt"] and x["reward"] == r["reward"]
            ids = tok(x["completion"], add_special_tokens=False)["input_ids"]
            assert ids == full[: len(ids)] and (len(ids) < len(full) or not full)  # a strict prefix (or the prompt)
    assert out == prefix_rows(rows, tok, 3, seed=0) and out != prefix_rows(rows, tok, 3, seed=1)


def test_prefixes_train_a_critic_of_unfinished_text(tiny_gpt2, tmp_path):
    """Reward = the number of 'yes' among four words. Trained on prefixes as well (their target
    the whole completion's reward), the model predicts the reward from held-out prefixes with
    less error than the same model trained on finished text alone."""
    rows = _rated(160)
    data = _write_jsonl(tmp_path / "rated.jsonl", rows)
    kw = dict(lora=False, learning_rate=3e-3, epochs=4, eval_fraction=0.25)
    plain = train_reward_model(_cfg(tiny_gpt2, data, **kw), tmp_path / "rm", echo=lambda s: None)
    assert "prefix_after" not in plain
    m = train_reward_model(_cfg(tiny_gpt2, data, prefixes=3, **kw), tmp_path / "rm-prefixes", echo=lambda s: None)
    assert (m["train_rows"], m["eval_rows"], m["prefixes"], m["prefix_rows"]) == (120, 40, 3, 120)
    assert m["steps"] == 4 * math.ceil(120 * 4 / 8)  # 4 epochs over 120 completions and 360 prefixes, 8 a batch
    _, held = split_rows(rows, 0.25, 0)
    model = load_reward_model(tmp_path / "rm")
    held_prefixes = prefix_rows(held, model.tokenizer, 3, seed=2)  # the ones the prefix run was measured on
    assert m["prefix_after"]["mse"] < evaluate_reward_model(model, "regression", held_prefixes)["mse"]
    assert m["prefix_after"]["mse"] < m["prefix_before"]["mse"]


def test_prefixes_need_rated_completions(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(4))
    with pytest.raises(UserError) as err:
        train_reward_model(_cfg(tiny_llama, data, prefixes=2), tmp_path / "rm", echo=lambda s: None)
    assert str(err.value) == (f"prefixes needs rated completions, and {data} holds preference pairs "
                              "(set prefixes=0, or give {prompt, completion, reward} rows)")
    assert not (tmp_path / "rm").exists()


def test_save_load_gives_identical_scores(trained_pairs):
    out, cfg, _, _ = trained_pairs
    rows = _pairs(6, seed=7)
    p, c = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    first = load_reward_model(out)
    second = load_reward_model(out / WEIGHTS_FILE)
    assert first.score(p, c) == second.score(p, c)
    fresh = RewardModel.build(cfg)  # an untrained model scores differently
    assert fresh.score(p, c) != first.score(p, c)


def test_learned_reward_function(trained_pairs):
    out = trained_pairs[0]
    fn = learned_reward(out)
    rows = _pairs(5, seed=3)
    prompts = [r["prompt"] for r in rows]
    good, bad = fn(prompts, [r["chosen"] for r in rows], extra=[1] * 5), fn(prompts, [r["rejected"] for r in rows])
    assert len(good) == 5 and all(isinstance(v, float) and math.isfinite(v) for v in good)
    assert sum(g > b for g, b in zip(good, bad)) >= 4
    assert learned_reward(out).model is fn.model  # cached per path
    assert resolve_learned(f"rm:{out}").model is fn.model
    assert resolve_learned("distinct1") is None
    with pytest.raises(UserError, match="is not a saved reward model"):
        resolve_learned(f"rm:{out.parent / 'nowhere'}")


def test_save_into_existing_folder_keeps_other_files(tiny_llama, tmp_path):
    data = _write_jsonl(tmp_path / "pairs.jsonl", _pairs(4))
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    train_reward_model(_cfg(tiny_llama, data, epochs=1, eval_fraction=0.5), out, echo=lambda s: None)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "manifest.json", META_FILE, WEIGHTS_FILE])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- data errors
PAIR = {"prompt": "the cat", "chosen": "yes", "rejected": "no"}
RATED = {"prompt": "the cat", "completion": "yes", "reward": 1.0}


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "a",'], "{f}: line 1 is not valid JSON (Expecting property name enclosed in double quotes) (fix that line)"),
        (["[1, 2]"], "{f}: line 1 is not a JSON object (write one {{...}} per line)"),
        (
            ['{"prompt": "the cat", "answer": "yes"}'],
            "{f}: line 1 is neither a rated completion nor a preference pair "
            "(give {{prompt, completion, reward}} or {{prompt, chosen, rejected}} rows)",
        ),
        (
            [json.dumps(PAIR), "", json.dumps({"prompt": "a", "chosen": "yes"})],
            "{f}: line 3 has no field 'rejected' (line 1 is a preference pair, so every row needs prompt, chosen, rejected)",
        ),
        (
            [json.dumps(RATED), json.dumps(PAIR)],
            "{f}: line 2 has no field 'completion' (line 1 is a rated completion, so every row needs prompt, completion, reward)",
        ),
        (
            [json.dumps(PAIR), json.dumps({**PAIR, "reward": 1})],
            "{f}: line 2 mixes a preference pair with field 'reward' (use one kind of row per file)",
        ),
        (
            [json.dumps({**RATED, "reward": "high"})],
            "{f}: line 1: field 'reward' must be a finite number, not 'high' (fix that line)",
        ),
        (
            [json.dumps({**RATED, "reward": True})],
            "{f}: line 1: field 'reward' must be a finite number, not True (fix that line)",
        ),
        ([json.dumps({**PAIR, "chosen": 3})], "{f}: line 1: field 'chosen' must be a string (fix that line)"),
        ([json.dumps({**PAIR, "prompt": " "})], "{f}: line 1: field 'prompt' must be a non-empty string (fix that line)"),
        (["", "  "], "reward data file '{f}' is empty (give at least one row)"),
    ],
)
def test_malformed_rows_give_exact_errors(tmp_path, lines, message):
    f = tmp_path / "rm.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_reward_rows(str(f))
    assert str(err.value) == message.format(f=f)


def test_missing_file_and_too_few_rows(tmp_path, tiny_llama):
    with pytest.raises(UserError) as err:
        read_reward_rows(str(tmp_path / "none.jsonl"))
    assert str(err.value) == f"reward data file '{tmp_path / 'none.jsonl'}' not found (check the path in `data`)"
    one = _write_jsonl(tmp_path / "one.jsonl", [PAIR])
    with pytest.raises(UserError) as err:
        train_reward_model(_cfg(tiny_llama, one, eval_fraction=0.1), tmp_path / "rm", echo=lambda s: None)
    assert str(err.value) == f"{one}: 1 row(s) are too few to hold out 0.1 of them (add rows or lower eval_fraction)"
    assert not (tmp_path / "rm").exists()
    assert read_reward_rows(str(_write_jsonl(tmp_path / "ok.jsonl", [RATED, RATED]))) == ("regression", [RATED, RATED])


# ---------------------------------------------------------------------------- online refit
def test_fit_reduces_error_on_its_data(tiny_llama):
    model = RewardModel.build(_cfg(tiny_llama))
    rows = _rated(32, seed=5)
    p, c = [r["prompt"] for r in rows], [r["completion"] for r in rows]
    y = torch.tensor([r["reward"] for r in rows])

    def mse() -> float:
        return regression_loss(torch.tensor(model.score(p, c)), y).item()

    before = mse()
    first = model.fit(p, c, y.tolist(), steps=15, batch_size=8, lr=1e-2)
    opt = model._fit_opt
    second = model.fit(p, c, y.tolist(), steps=15, batch_size=8, lr=1e-2)
    assert model._fit_opt is opt  # one optimizer across calls
    assert second < first
    assert mse() < 0.5 * before
    assert model.fit(p, c, y.tolist(), steps=0) == 0.0
