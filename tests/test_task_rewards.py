"""Task rewards (translation, poem, guards) and eval metrics, against sacrebleu and hand values.
Fast: no language model is loaded (theme_relevance's encoder is stubbed)."""

from pathlib import Path

import pytest
import sacrebleu

from dynalm import metrics as M
from dynalm.config import RewardTerm, load_config
from dynalm.errors import UserError
from dynalm.rewards import BUILTINS, RewardSet
from dynalm.rewards import tasks as T

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

PAIRS = [
    ("Le soleil brille ce matin.", "Le soleil brille ce matin."),
    ("Le soleil brille le matin.", "Le soleil brille ce matin."),
    ("J'aime le gâteau au chocolat.", "J'adore le gâteau au chocolat."),
    ("Attendez ici, s'il vous plaît.", "Attendez ici un instant, s'il vous plaît."),
    ("chat", "Elle est calme et patiente."),
    ("", "Elle est calme et patiente."),
]


def test_translation_rewards_match_sacrebleu():
    hyps = [h for h, _ in PAIRS]
    refs = [r for _, r in PAIRS]
    prompts = ["src"] * len(hyps)
    got_chrf = T.chrf(prompts, hyps, reference=refs)
    got_bleu = T.bleu(prompts, hyps, reference=refs)
    got_ter = T.ter(prompts, hyps, reference=refs)
    for i, (h, r) in enumerate(PAIRS):
        assert got_chrf[i] == pytest.approx(sacrebleu.sentence_chrf(h, [r]).score / 100)
        assert got_bleu[i] == pytest.approx(sacrebleu.sentence_bleu(h, [r]).score / 100)  # effective order
        assert got_ter[i] == pytest.approx(-sacrebleu.sentence_ter(h, [r]).score / 100)  # sign flipped
    # scale and sign: exact match is the best value of each
    assert got_chrf[0] == pytest.approx(1.0) and got_bleu[0] == pytest.approx(1.0) and got_ter[0] == 0.0
    assert all(0.0 <= v <= 1.0 for v in got_chrf + got_bleu)
    assert all(v <= 0.0 for v in got_ter)
    assert got_ter[1] > got_ter[4]  # one edit beats a wrong word: higher is better
    assert got_ter[5] == pytest.approx(-1.0)  # empty: every reference word is an edit
    # several references for one row
    two = T.bleu(["s"], ["the cat sat"], reference=[["a dog ran", "the cat sat"]])
    assert two == [pytest.approx(1.0)]


@pytest.mark.parametrize("name", ["chrf", "bleu", "ter"])
def test_translation_rewards_need_reference(name):
    with pytest.raises(UserError) as ei:
        BUILTINS[name](["hello"], ["bonjour"])
    assert ei.value.what == f"reward '{name}' needs a 'reference' field in the data rows"
    assert "reference" in ei.value.fix
    # also through RewardSet, the way the environment calls it (not wrapped in another error)
    with pytest.raises(UserError, match=f"^reward '{name}' needs a 'reference' field in the data rows"):
        RewardSet([RewardTerm(name=name)])(["hello"], ["bonjour"], ended=[True])
    # rows that lack it come through as None
    with pytest.raises(UserError, match="needs a 'reference' field"):
        BUILTINS[name](["a", "b"], ["x", "y"], reference=["x", None])


def test_rhyme_hand():
    assert T.rhyme([""], ["The cat sat on the mat\nIt wore a funny hat"]) == [1.0]
    assert T.rhyme([""], ["The cat sat on the mat\nThe dog ran to the tree"]) == [0.0]
    assert T.rhyme([""], ["Only one line about a cat"]) == [0.0]
    assert T.rhyme([""], [""]) == [0.0]
    # blank lines and trailing punctuation are ignored
    assert T.rhyme([""], ["\nThe cat sat on the mat,\n\n  It wore a funny hat!\n"]) == [1.0]
    # the same word twice is not a rhyme
    assert T.rhyme([""], ["I sat on the mat\nYou sat on the mat"]) == [0.0]
    aabb = "I saw a cat\nIt sat on a mat\nThe sky was blue\nThe wind just flew"
    abab = "I saw a cat\nThe sky was blue\nIt sat on a mat\nThe wind just flew"
    half = "I saw a cat\nIt sat on a mat\nThe sky was blue\nThe road was long"
    assert T.rhyme([""], [aabb]) == [1.0]
    assert T.rhyme([""], [abab]) == [1.0]
    assert T.rhyme([""], [half]) == [0.5]
    assert T.rhyme([""], [aabb], scheme="abab") == [0.0]
    assert T.rhyme([""], [abab], scheme="aabb") == [0.0]
    # words outside the CMU dictionary rhyme with nothing
    assert T.words_rhyme("cat", "zzqxv") is False
    assert T.words_rhyme("day", "away") is True


def test_line_shape_hand():
    four = "one two three\none two three four\nsome words are here\nand a last line too"
    assert T.line_shape([""], [four]) == [1.0]
    # 2 lines, both 3..12 words: 0.5 * (1 - 2/4) + 0.5 * 1
    assert T.line_shape([""], ["one two three\nfour five six"]) == [pytest.approx(0.75)]
    # 4 lines, one with 2 words: 0.5 * 1 + 0.5 * 3/4
    bad = "one two\none two three\none two three\none two three"
    assert T.line_shape([""], [bad]) == [pytest.approx(0.875)]
    # 8 lines, each one word: count 0.5 * max(0, 1 - 4/4) + 0.5 * 0
    assert T.line_shape([""], ["w\n" * 8]) == [0.0]
    assert T.line_shape([""], [""]) == [0.0]
    # kwargs: target 2 lines of 1..2 words
    assert T.line_shape([""], ["a b\nc"], lines=2, min_words=1, max_words=2) == [1.0]


def test_theme_relevance_uses_cosine_pairs(monkeypatch):
    from dynalm.rewards import models

    seen = {}

    def fake(a, b):
        seen["a"], seen["b"] = a, b
        return [0.25] * len(a)

    monkeypatch.setattr(models, "cosine_pairs", fake)
    out = T.theme_relevance(["a snowy owl", "rain"], ["White wings at night", "  "])
    assert out == [0.25, 0.25]
    assert seen["a"] == ["a snowy owl", "rain"] and seen["b"] == ["White wings at night", "."]


def test_eos_and_length_floor_hand():
    assert T.eos(["", "", ""], ["a", "b", "c"], ended=[True, False, True]) == [1.0, 0.0, 1.0]
    with pytest.raises(UserError, match="'ended'"):
        T.eos([""], ["a"])
    comps = ["one two three four five", "one two three four five six", "one two", ""]
    assert T.length_floor([""] * 4, comps) == [0.0, 0.0, pytest.approx(-0.6), -1.0]
    assert T.length_floor([""], ["a b c"], min_words=4) == [pytest.approx(-0.25)]


def test_self_bleu():
    same = ["the cat sat on the mat today"] * 3
    assert M.self_bleu(same) == pytest.approx(1.0)
    assert M.self_bleu(["alpha beta gamma", "delta epsilon zeta", "eta theta iota"]) == 0.0
    assert M.self_bleu(["just one"]) == 0.0
    texts = ["the cat sat on the mat", "a dog sat on the mat", "the cat ran to the tree", "birds sing at dawn"]
    direct = [sacrebleu.sentence_bleu(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    assert M.self_bleu(texts) == pytest.approx(sum(direct) / len(direct) / 100)
    assert 0.0 < M.self_bleu(texts) < 1.0


def test_corpus_metrics_match_sacrebleu():
    hyps = [h for h, _ in PAIRS]
    refs = [r for _, r in PAIRS]
    assert M.corpus_chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert M.corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert M.corpus_ter(hyps, refs) == pytest.approx(sacrebleu.corpus_ter(hyps, [refs]).score)
    multi = [[r, "x"] for r in refs]
    assert M.corpus_bleu(hyps, multi) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs, ["x"] * len(refs)]).score)


def test_reward_hacking_flags():
    base = {"reward": 0.2, "distinct2": 0.80, "kl": 0.0, "mean_length": 40.0, "eos_rate": 0.9}
    fine = {"reward": 0.5, "distinct2": 0.78, "kl": 3.0, "mean_length": 30.0, "eos_rate": 0.8}
    assert M.reward_hacking_flags(base, fine) == []
    hacked = {"reward": 0.9, "distinct2": 0.40, "kl": 25.0, "mean_length": 12.0, "eos_rate": 0.3}
    flags = M.reward_hacking_flags(base, hacked)
    assert len(flags) == 4
    assert "distinct-2 fell" in flags[0] and "KL" in flags[1] and "length" in flags[2] and "EOS" in flags[3]
    # distinct-2 falling alone, without a reward gain, is not the reward-hacking pattern
    assert M.reward_hacking_flags(base, {**fine, "distinct2": 0.5, "reward": 0.1}) == []
    # thresholds are strict and the KL threshold is configurable
    edge = {"reward": 0.5, "distinct2": 0.75, "kl": 10.0, "mean_length": 20.0, "eos_rate": 0.7}
    only_d2 = M.reward_hacking_flags(base, {**edge, "distinct2": 0.749})
    assert len(only_d2) == 1 and "distinct-2" in only_d2[0]
    assert M.reward_hacking_flags(base, edge) == []
    assert len(M.reward_hacking_flags(base, edge, kl_threshold=5.0)) == 1
    # missing keys skip their check
    only_kl = M.reward_hacking_flags({}, {"kl": 11.0})
    assert len(only_kl) == 1 and "KL" in only_kl[0]
    assert M.reward_hacking_flags(base, {"reward": float("nan")}) == []


@pytest.mark.parametrize(
    "preset,names",
    [
        ("sentiment", ["sentiment", "repetition", "eos", "length_floor"]),
        ("translation", ["chrf", "bleu", "ter", "eos", "repetition"]),
        ("poem", ["rhyme", "line_shape", "theme_relevance", "repetition", "eos"]),
    ],
)
def test_presets_load_and_resolve(preset, names):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    assert cfg.task == preset and cfg.algorithm.name == "ppo"
    assert cfg.train.steps == 40 and cfg.train.batch_size == 8 and cfg.train.learning_rate == pytest.approx(3e-4)
    assert 48 <= cfg.generation.max_new_tokens <= 64
    rs = RewardSet(cfg.rewards)
    assert rs.names == names
    for n in names:
        assert n in BUILTINS


def test_translation_preset_scores_a_batch():
    """The translation preset's rewards run end to end on real data rows (no LM needed)."""
    from dynalm.data import read_rows

    cfg = load_config(CONFIGS / "translation.yaml")
    rows = read_rows(cfg.data.eval, cfg.data.prompt_field)[:3]
    prompts = [r["source"] for r in rows]
    extras = {"reference": [r["reference"] for r in rows], "ended": [True, False, True]}
    scored = RewardSet(cfg.rewards)(prompts, [r["reference"] for r in rows], **extras)
    assert scored.terms["chrf"] == [pytest.approx(1.0)] * 3 and scored.terms["ter"] == [0.0] * 3
    assert scored.terms["eos"] == [1.0, 0.0, 1.0]
