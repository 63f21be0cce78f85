"""Reward functions against hand-computed values; resolution and composition."""

import pytest

from dynalm.config import RewardTerm
from dynalm.errors import UserError
from dynalm.rewards import RewardSet, resolve
from dynalm.rewards import text as T


def test_distinct_n_hand():
    assert T.distinct_n_one("a b a b", 1) == pytest.approx(2 / 4)
    assert T.distinct_n_one("a b a b", 2) == pytest.approx(2 / 3)  # ab, ba, ab
    assert T.distinct_n_one("word", 2) == 0.0
    assert T.distinct_n_corpus(["a b", "a b c"], 2) == pytest.approx(2 / 3)  # ab, ab, bc


def test_repetition_and_novelty_hand():
    assert T.repeated_ngram_share("x y z x y z", 3) == pytest.approx(1 / 4)  # xyz yzx zxy xyz → 1 repeat
    assert T.repeated_ngram_share("short", 3) == 0.0
    # content words of "the dragon slept near the castle": dragon slept near castle; near is not a stop word
    assert T.novelty_one("A dragon lived in a castle.", "The dragon slept near the castle") == pytest.approx(2 / 4)
    assert T.novelty_one("x", "the of and") == 0.0


def test_length_reward():
    assert T.length([""], ["one two three four"]) == [4.0]
    assert T.length([""], ["one two three four"], target=8) == [0.5]


def test_resolve_builtins_files_and_modules(tmp_path):
    assert resolve("distinct2") is T.distinct2
    assert resolve("dynalm.rewards.text:novelty") is T.novelty
    f = tmp_path / "r.py"
    f.write_text("def score(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    fn = resolve(f"{f}:score")
    assert fn(["p"], ["abc"]) == [3]
    with pytest.raises(UserError, match="has no function 'nope'"):
        resolve(f"{f}:nope")
    with pytest.raises(UserError, match="reward file .* not found"):
        resolve("missing_dir/x.py:f")


def test_reward_set_weights_terms_and_extras(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def ref_len(prompts, completions, reference=None, **kw):\n    return [len(r) for r in reference]\n")
    rs = RewardSet([RewardTerm(name="distinct1", weight=2.0), RewardTerm(name=f"{f}:ref_len", weight=-0.5)])
    out = rs(["p", "p"], ["a a", "a b"], reference=["xx", "xxxx"])
    assert out.terms == {"distinct1": [0.5, 1.0], "ref_len": [2.0, 4.0]}
    assert out.scores == [2 * 0.5 - 0.5 * 2, 2 * 1.0 - 0.5 * 4]
    with pytest.raises(UserError, match="two reward terms are named 'distinct1'"):
        RewardSet([RewardTerm(name="distinct1"), RewardTerm(name="distinct1")])


def test_sentiment_vader():
    from dynalm.rewards.models import sentiment

    pos, neg = sentiment(["", ""], ["I love this, it is wonderful!", "This is awful and I hate it."])
    assert pos > 0.5 and neg < -0.5


def test_relatedness_minilm_offline():
    from dynalm.rewards.models import relatedness

    same, other = relatedness(
        ["A knight fought a dragon in the mountains.", "A knight fought a dragon in the mountains."],
        ["The brave knight raised his sword against the fire-breathing beast.", "Quarterly tax filings are due in April."],
    )
    assert -1.0 <= other < same <= 1.0 and same - other > 0.2


def test_running_normalisation_and_clipping():
    rs = RewardSet([RewardTerm(name="length", normalize=True, clip=1.0)])
    # first batch: lengths 1 and 3 → running mean 2, std sqrt(2); scores (x − 2)/sqrt(2), clipped to ±1
    out = rs(["", ""], ["a", "a b c"], update_stats=True)
    assert out.terms["length"] == [1.0, 3.0]  # logged raw
    assert out.scores == pytest.approx([-(2**-0.5), 2**-0.5])
    # eval calls do not move the statistics
    rs(["", ""], ["a b c d e f g h", "a"], update_stats=False)
    assert rs.state_dict()["length"] == pytest.approx([2.0, 2.0, 2.0])
    out = rs([""], ["a b c d e f g h"])
    assert out.scores == [1.0]  # (8 − 2)/sqrt(2) ≈ 4.2, clipped
    rs2 = RewardSet([RewardTerm(name="length", normalize=True, clip=1.0)])
    rs2.load_state_dict(rs.state_dict())
    assert rs2([""], ["a b"]).scores == rs([""], ["a b"]).scores


TRL_SHAPES = '''
def short(completions, **kwargs):          # TRL docs: a reward that reads only the completions
    return [-float(len(c)) for c in completions]


def accuracy(completions, solution, **kwargs):  # TRL docs: a dataset column by its name
    return [1.0 if c.strip() == s else 0.0 for c, s in zip(completions, solution)]


def ours(prompts, completions, **kwargs):  # dynalm's own shape keeps working
    return [float(p in c) for p, c in zip(prompts, completions)]
'''


def test_reward_functions_written_for_trl_work_unchanged(tmp_path):
    """Issue 12.10: rewards were called positionally, so `short` got the prompts as its
    completions and `accuracy` raised (two positional args, and `solution` twice)."""
    from dynalm.config import build_config
    from dynalm.envs import TextEnv

    f = tmp_path / "trl_rewards.py"
    f.write_text(TRL_SHAPES)
    cfg = build_config({"rewards": [{"name": f"{f}:short"}, {"name": f"{f}:accuracy"}, {"name": f"{f}:ours"}]})
    env = TextEnv(cfg, tokenizer=None)
    rows = [{"prompt": "2+2=", "solution": "4"}, {"prompt": "3+3=", "solution": "6"}]
    _, scored, _ = env.step(rows, ["4", "3+3= is 5"], [True, True])
    assert scored.terms["short"] == [-1.0, -9.0]  # the completions' lengths, not the prompts'
    assert scored.terms["accuracy"] == [1.0, 0.0]
    assert scored.terms["ours"] == [0.0, 1.0]
    assert scored.scores == [0.0, -8.0]


def test_mentions_is_sparse_and_whole_word():
    from dynalm.rewards import RewardSet
    from dynalm.rewards.text import mentions

    assert mentions(["x"] * 4, ["My Dog loved it", "a dogma", "cats!", "nothing"], words=["dog", "cats"]) == [1.0, 0.0, 1.0, 0.0]
    rs = RewardSet([RewardTerm(name="mentions", kwargs={"words": ["owl"]})])
    assert rs(["p", "p"], ["an owl", "a bowl"]).scores == [1.0, 0.0]
    with pytest.raises(ValueError, match="mentions needs kwargs"):
        mentions([], [])


OPENING = "The old lighthouse keeper climbed the stairs every night to light the lamp."
RESTATED = "The old lighthouse keeper climbed the stairs every night, and then he lit the lamp."
CONTINUED = "One stormy evening he saw a small boat drifting toward the rocks below the tower."


def test_copy_marks_words_inside_reproduced_ngrams():
    # "the old lighthouse keeper climbed the stairs every night": 9 of the restatement's 15 words
    assert T.copy([OPENING], [RESTATED]) == [pytest.approx(9 / 15)]
    assert T.copy([OPENING], [CONTINUED]) == [0.0]
    assert T.copy(["a b c d"], ["x a b c d y"]) == [pytest.approx(4 / 6)]
    assert T.copy(["a b c"], ["a b c"]) == [0.0]  # shorter than a 4-gram: nothing to copy
    assert T.uncopied_text(OPENING, RESTATED) == "and then he lit the lamp"


def test_a_restatement_scores_below_a_continuation_once_copying_does_not_pay():
    """Issue 20: the story reward bought relatedness by restating the opening."""
    old = RewardSet([RewardTerm(name="relatedness"), RewardTerm(name="novelty", weight=0.5)])
    new = RewardSet([RewardTerm(name="relatedness", kwargs={"exclude_copied": True}), RewardTerm(name="novelty", weight=0.5),
                     RewardTerm(name="copy", weight=-1.0)])
    o = old([OPENING] * 2, [RESTATED, CONTINUED]).scores
    n = new([OPENING] * 2, [RESTATED, CONTINUED]).scores
    assert o[0] > o[1]  # the old reward prefers the restatement
    assert n[1] > n[0]  # the new one the continuation
