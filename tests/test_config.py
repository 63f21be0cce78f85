"""Config loading, overrides and validation."""

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dynalm.rl.algorithms import ALGORITHMS
from dynalm.config import Config, deep_merge, dump_config, load_config, parse_set
from dynalm.errors import UserError


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config()
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_shipped_configs_load():
    for name in ["story", "seed"]:
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.task == name
    seed = load_config("configs/seed.yaml")
    assert seed.algorithm.name == "a2c" and (seed.algorithm.advantage or ALGORITHMS["a2c"].default_advantage) == "td"
    assert len(seed.data.prompts) == 5 and seed.generation.max_new_tokens == 50
    assert seed.train.learning_rate == 1e-4 and seed.log.print_episodes


def test_set_parses_yaml_scalars_and_nesting():
    assert parse_set(["train.steps=3", "kl.coef=0.1", "model.lora.enabled=false", "task=x"]) == {
        "train": {"steps": 3},
        "kl": {"coef": 0.1},
        "model": {"lora": {"enabled": False}},
        "task": "x",
    }
    with pytest.raises(UserError, match="is not key=value"):
        parse_set(["train.steps"])


def test_set_addresses_reward_items():
    cfg = load_config("configs/story.yaml", ["rewards.1.weight=2.5"])
    assert cfg.rewards[1].name == "distinct2" and cfg.rewards[1].weight == 2.5
    with pytest.raises(UserError, match=r"--set rewards.9: there are 6 reward terms \(use an index in range\)"):
        load_config("configs/story.yaml", ["rewards.9.weight=1"])


@pytest.mark.parametrize(
    "key,bad,suggest",
    [
        ("train.learning_rat", "train.learning_rat", "train.learning_rate"),
        ("algoritm.name", "algoritm", "algorithm"),
        ("kl.coeff", "kl.coeff", "kl.coef"),
        ("model.lora.rank", "model.lora.rank", "model.lora.r"),
    ],
)
def test_unknown_key_suggests_closest(key, bad, suggest):
    with pytest.raises(UserError) as e:
        load_config(None, [f"{key}=1"])
    assert str(e.value) == f"unknown config key '{bad}' (did you mean '{suggest}'?)"


def test_batch_must_divide_into_groups():
    with pytest.raises(UserError, match=r"train.batch_size \(6\) must be a multiple of algorithm.num_generations \(4\)"):
        load_config(None, ["algorithm.name=grpo", "algorithm.num_generations=4", "train.batch_size=6"])


def test_value_head_default_follows_algorithm():
    assert load_config(None, ["algorithm.name=ppo"]).use_value_head
    assert not load_config(None, ["algorithm.name=rloo", "algorithm.num_generations=2"]).use_value_head


def test_bad_yaml_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(p)


def test_deep_merge_is_pure():
    a = {"x": {"y": 1, "z": 2}}
    b = {"x": {"y": 5}}
    assert deep_merge(a, b) == {"x": {"y": 5, "z": 2}}
    assert a == {"x": {"y": 1, "z": 2}}


_keys = st.sampled_from(["train", "model", "kl", "algorithm", "bogus", "train.steps", "kl.coef", "model.lora.r", "x.y.z"])
_vals = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(), st.none(), st.lists(st.integers(), max_size=2))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, _vals, max_size=4))
def test_fuzzed_configs_validate_or_raise_user_error(raw):
    """Whatever YAML holds, the loader returns a Config or raises a one-line UserError."""
    nested: dict = {}
    for k, v in raw.items():
        try:
            nested = deep_merge(nested, parse_set([f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"]))
        except UserError:
            return
    try:
        cfg = load_config(None, nested)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)


@pytest.mark.parametrize("sets", [["algorithm.epochs=2"], ["train.batch_size=8", "algorithm.minibatch_size=4"]])
def test_a2c_refuses_off_policy_updates(sets):
    """Issue 12.3: a2c's loss has no importance ratio, so a second epoch or a smaller minibatch
    would be an off-policy update; both used to be accepted silently."""
    with pytest.raises(UserError) as e:
        load_config(None, ["algorithm.name=a2c", *sets])
    assert str(e.value) == (
        "invalid config: a2c is on-policy (its loss has no importance ratio): it takes one gradient step per batch; "
        "set algorithm.epochs: 1 and algorithm.minibatch_size: null, or use algorithm.name: ppo (fix the config)"
    )
    load_config(None, ["algorithm.name=a2c", "train.batch_size=8", "algorithm.minibatch_size=8"])  # one step: fine
    load_config(None, ["algorithm.name=ppo", *sets])


@pytest.mark.parametrize("algo", ["a2c", "ppo", "rloo"])
def test_k3_is_refused_as_a_reward_kl(algo):
    """Issue 12.2: k3 as a per-token reward has a biased gradient (tests/test_losses.py)."""
    sets = [f"algorithm.name={algo}", "kl.estimator=k3"] + (["algorithm.num_generations=2"] if algo == "rloo" else [])
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert str(e.value) == (
        f"invalid config: kl.estimator k3 as a reward gives {algo} a biased KL gradient; "
        "use kl.estimator: k1 (k3 is right only inside grpo's loss) (fix the config)"
    )
    load_config(None, ["algorithm.name=grpo", "algorithm.num_generations=2", "kl.estimator=k3"])
