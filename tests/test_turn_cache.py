"""Multi-turn rollouts keep the KV cache across turns (generation.turn_cache): a later turn
prefills only its new tokens, and the episodes, log-probs and values are those of a rollout
that re-reads the whole conversation every turn, and of one forward over it."""

import pytest
import torch

from dynalm.models import generation
from dynalm.rl import episodes

from test_dialog import ROWS, _rollout, _setup, dialog_rows, turn_reward_file  # noqa: F401 (fixtures)


def _prefill_widths(monkeypatch, module=episodes):
    """Columns each turn's first forward reads (the new tokens `module` gives sample_turn),
    and whether it ran after a cache."""
    widths = []
    real = module.sample_turn

    def spy(model, new_ids, new_mask, gen, prefix, **kw):
        widths.append((new_ids.shape[1], prefix is not None))
        return real(model, new_ids, new_mask, gen, prefix, **kw)

    monkeypatch.setattr(module, "sample_turn", spy)
    return widths


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])  # the fast decoder's static cache; transformers' cache
def test_turn_cache_reads_only_new_tokens_and_changes_nothing(fixture, request, dialog_rows, turn_reward_file, monkeypatch):
    # a third of the vocabulary stops a turn, so rows end turns early and leave holes in the cache
    monkeypatch.setattr(generation, "stop_ids", lambda tok, cfg=None: set(range(0, len(tok), 3)))
    widths = _prefill_widths(monkeypatch)
    out = {}
    for on in (True, False):
        cfg, model, env = _setup(request.getfixturevalue(fixture), dialog_rows, turn_reward_file,
                                 generation={"max_new_tokens": 6, "turn_cache": on})
        with torch.no_grad():
            model.value_head.weight.normal_(std=0.1)
        widths.clear()
        batch, _ = _rollout(cfg, model, env)
        out[on] = batch, list(widths), model
    (b_on, w_on, model), (b_off, w_off, _) = out[True], out[False]
    # the same episodes, token for token
    assert torch.equal(b_on.input_ids, b_off.input_ids) and torch.equal(b_on.attention_mask, b_off.attention_mask)
    assert torch.equal(b_on.action_mask, b_off.action_mask) and b_on.completions == b_off.completions
    assert torch.allclose(b_on.logprobs, b_off.logprobs, atol=1e-5) and torch.allclose(b_on.values, b_off.values, atol=1e-5)
    full = model(b_on.input_ids, b_on.attention_mask, b_on.n_actions)
    assert torch.allclose(full.logprobs * b_on.action_mask, b_on.logprobs, atol=1e-5)
    assert torch.allclose(full.values * b_on.action_mask, b_on.values, atol=1e-5)
    # some turns stopped early (holes), and later turns did run from the cache
    assert not bool(b_on.ended.all()) or (b_on.action_mask.sum(-1) < b_on.n_actions).any()
    assert len(w_on) == len(w_off) >= 2 and not w_on[0][1] and all(cached for _, cached in w_on[1:])
    assert not any(cached for _, cached in w_off)
    assert all(a < b for (a, _), (b, _) in zip(w_on[1:], w_off[1:]))  # only the unread tokens, not the conversation


def test_a_row_with_nothing_unread_falls_back_to_a_full_prefill(tiny_llama, dialog_rows, turn_reward_file, monkeypatch):
    """An empty observation after a turn whose last token was already read leaves no token
    to start the next turn from: that turn re-reads the conversation, and nothing changes."""
    from dynalm.envs.dialog import DialogEnv

    widths = _prefill_widths(monkeypatch)
    real_advance = DialogEnv.advance

    def advance(self, *a, **k):
        turn = real_advance(self, *a, **k)
        turn.glue = ["" for _ in turn.glue]  # nothing between two assistant turns
        return turn

    monkeypatch.setattr(DialogEnv, "advance", advance)
    monkeypatch.setattr(generation, "stop_ids", lambda tok, cfg=None: set(range(0, len(tok), 2)))
    cfg, model, env = _setup(tiny_llama, dialog_rows, turn_reward_file, generation={"max_new_tokens": 6})
    batch, _ = _rollout(cfg, model, env)
    full = model(batch.input_ids, batch.attention_mask, batch.n_actions)
    assert torch.allclose(full.logprobs * batch.action_mask, batch.logprobs, atol=1e-5)
    assert batch.input_ids.shape[0] == len(ROWS) and len(widths) == 3
    assert any(not cached for _, cached in widths[1:])  # a later turn had to re-read the conversation


def test_turn_cache_select_and_pending_by_hand():
    kv = [(torch.arange(2 * 1 * 3 * 2.0).view(2, 1, 3, 2), -torch.arange(2 * 1 * 3 * 2.0).view(2, 1, 3, 2))]
    c = generation.TurnCache(kv, torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[1, 1, 1], [0, 1, 1]]))
    s = c.select([1])
    assert s.ids.tolist() == [[8, 9, 10]] and s.mask.tolist() == [[0, 1, 1]] and torch.equal(s.kv[0][0], kv[0][0][1:])
    # a turn's output: 3 read columns + 1 unread; row 1 had stopped, so its last column is a hole
    out = torch.tensor([[5, 6, 7, 11], [8, 9, 10, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    assert c.pending(out, mask) == [[11], []]


def test_one_token_turns_from_a_shared_prompt_keep_a_cache_of_every_row(tiny_gpt2, dialog_rows, turn_reward_file):
    """grpo's group rows share one prefill; with one-token turns the cache used to be left at the
    distinct prompts (n < B rows, unique order), so the next turn indexed past it or read another
    prompt's keys. The cache now holds every row, and the episodes match one forward."""
    out = {}
    for on in (True, False):
        cfg, model, env = _setup(tiny_gpt2, dialog_rows, turn_reward_file, algo="grpo",
                                 generation={"max_new_tokens": 1, "turn_cache": on})
        batch, _ = _rollout(cfg, model, env)
        out[on] = batch, model
    (b_on, model), (b_off, _) = out[True], out[False]
    assert torch.equal(b_on.input_ids, b_off.input_ids) and torch.allclose(b_on.logprobs, b_off.logprobs, atol=1e-5)
    full = model(b_on.input_ids, b_on.attention_mask, b_on.n_actions)
    assert torch.allclose(full.logprobs * b_on.action_mask, b_on.logprobs, atol=1e-5)


def test_turn_cache_reuse_keeps_the_common_prefix_by_hand():
    kv = [(torch.zeros(2, 1, 4, 2), torch.zeros(2, 1, 4, 2))]
    c = generation.TurnCache(kv, torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    # row 0 read [5, 6, 7]; its new prompt shares [5, 6]. Row 1 read [8, 9, 10, 11], all of them
    # the new prompt's start, but one token must stay new to give the first logits
    kept, rest = c.reuse([[5, 6, 3, 4], [8, 9, 10, 11]])
    assert kept.mask.tolist() == [[0, 1, 1, 0], [1, 1, 1, 0]] and rest == [[3, 4], [11]]
    assert c.mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]  # the cache it came from is untouched
    none, same = c.reuse([[1, 2], [2]])
    assert none is None and same == [[1, 2], [2]]
    with pytest.raises(ValueError, match="the turn cache holds 2 rows, the prompts 1"):
        c.reuse([[5]])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_the_user_simulator_keeps_its_cache_and_changes_nothing(fixture, request, dialog_rows, turn_reward_file, monkeypatch):
    """env.user_generation.turn_cache: the simulator's later prompts are re-rendered text, so
    the part they share with what it read last turn is kept and only the rest is prefilled."""
    from dynalm.envs import dialog

    monkeypatch.setattr(generation, "stop_ids", lambda tok, cfg=None: set(range(0, len(tok), 3)))
    widths = _prefill_widths(monkeypatch, dialog)
    out = {}
    for on in (True, False):
        env_cfg = {"kind": "dialog", "turns": 3, "turn_gamma": 0.9, "user_generation": {"max_new_tokens": 4, "turn_cache": on}}
        cfg, model, env = _setup(request.getfixturevalue(fixture), dialog_rows, turn_reward_file, env=env_cfg)
        widths.clear()
        batch, _ = _rollout(cfg, model, env)
        out[on] = batch, list(widths), [m["content"] for t in env.transcripts() for m in t]
    (b_on, w_on, t_on), (b_off, w_off, t_off) = out[True], out[False]
    assert t_on == t_off and torch.equal(b_on.input_ids, b_off.input_ids)  # the same user replies, the same episodes
    assert torch.allclose(b_on.logprobs, b_off.logprobs, atol=1e-5)
    assert w_off == []  # off: plain sampling, no cache kept
    # the user answers each of the three assistant turns (its reply is part of the turn's reward);
    # after the first, each prefill reads the new turn, not the whole conversation again
    assert len(w_on) == 3 and not w_on[0][1] and all(cached for _, cached in w_on[1:])
    assert all(w < w_on[0][0] for w, _ in w_on[1:])
