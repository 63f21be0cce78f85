"""Data in TRL's conversational format: a prompt that is a list of chat messages."""

import json

import yaml

from dynalm.cli import main
from dynalm.config import build_config
from dynalm.data import read_rows
from dynalm.envs import TextEnv
from dynalm.models.policy import PolicyValueModel

from conftest import tiny_overrides

CONV = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Count to 3."}]},
]

REWARD = '''
SEEN = []

def saw(prompts, completions, prompt_messages, **kwargs):
    SEEN.append((list(prompts), [m[-1]["content"] for m in prompt_messages]))
    return [float(len(c)) for c in completions]
'''


def test_conversational_rows_are_read_rendered_and_reach_rewards(tiny_llama, tmp_path):
    data = tmp_path / "conv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONV))
    rows = read_rows(str(data))
    assert rows == CONV
    (tmp_path / "r.py").write_text(REWARD)
    cfg = build_config(tiny_overrides(tiny_llama, data, rewards=[{"name": f"{tmp_path / 'r.py'}:saw"}]))
    model = PolicyValueModel.from_config(cfg)
    tok = model.tokenizer
    env = TextEnv(cfg, tok)
    tok.chat_template = "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}{% if add_generation_prompt %}<s> assistant {% endif %}"
    assert env.reset(rows[1]) == "<s> user Hi </s> <s> assistant Hello! </s> <s> user Count to 3. </s> <s> assistant "
    tok.chat_template = None  # no template: a plain transcript, the system message first
    assert env.reset(rows[0]) == "Be brief.\n\nUser: Name a fruit.\nAssistant:"
    _, scored, _ = env.step(rows, ["apple", "1 2 3"], [True, True])
    assert scored.terms["saw"] == [5.0, 5.0]
    import sys

    mod = next(m for k, m in sys.modules.items() if k.startswith("dynalm_user_") and hasattr(m, "SEEN"))
    assert mod.SEEN[-1] == (["Name a fruit.", "Count to 3."], ["Name a fruit.", "Count to 3."])

    over = tiny_overrides(tiny_llama, data, eval={"max_prompts": 2})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(over))
    assert main(["train", "-c", str(p), "--out", str(tmp_path / "run")]) == 0
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["prompt"] for s in samples} <= {"Name a fruit.", "Count to 3."}
