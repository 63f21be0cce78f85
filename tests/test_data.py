"""Data readers: built-ins, JSONL/CSV, malformed rows named by file and line."""

import json

import pytest

from dynalm.data import read_rows
from dynalm.errors import UserError


def test_builtin_story_splits():
    train = read_rows("builtin:story_train")
    ev = read_rows("builtin:story_eval")
    assert train[0]["prompt"] == "Once upon a time, there was a king who ruled a large kingdom."
    assert len(train) >= 185 and len(ev) >= 40  # the article's 5 + 200 of ours, 40+ held out
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}


def test_jsonl_and_csv(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"prompt": "a", "reference": "x"}\n\n{"prompt": "b"}\n')
    assert read_rows(str(j)) == [{"prompt": "a", "reference": "x"}, {"prompt": "b"}]
    c = tmp_path / "d.csv"
    c.write_text("text,label\nhello,1\nworld,0\n")
    assert read_rows(str(c), "text") == [{"text": "hello", "label": "1"}, {"text": "world", "label": "0"}]


@pytest.mark.parametrize(
    "content,msg",
    [
        ('{"prompt": "a"}\n{"prompt": \n', "line 2 is not valid JSON"),
        ('{"prompt": "a"}\n[1, 2]\n', "line 2 is not a JSON object"),
        ('{"prompt": "a"}\n{"text": "b"}\n', "line 2 has no field 'prompt'"),
        ('{"prompt": ""}\n', "line 1: field 'prompt' must be a non-empty string"),
        ("\n\n", "is empty"),
    ],
)
def test_malformed_rows(tmp_path, content, msg):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(UserError, match=msg) as e:
        read_rows(str(p))
    assert str(p) in str(e.value)


def test_unknown_builtin():
    with pytest.raises(UserError, match="no built-in data set 'nope'"):
        read_rows("builtin:nope")


def test_datasets_folder_with_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list([{"text": "a b", "ref": "x"}]), "test": datasets.Dataset.from_list([{"text": "c", "ref": "y"}])}
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    assert read_rows(str(tmp_path / "ds"), "text", "test") == [{"text": "c", "ref": "y"}]
    with pytest.raises(UserError, match=r"has no split 'validation' \(its splits: train, test"):
        read_rows(str(tmp_path / "ds"), "text", "validation")
    with pytest.raises(UserError, match=r"has no column 'prompt' \(its columns: text, ref"):
        read_rows(str(tmp_path / "ds"), "prompt", "train")


def test_reference_field_reaches_rewards(tmp_path):
    from dynalm.config import load_config
    from dynalm.run import train_rows

    p = tmp_path / "d.jsonl"
    p.write_text('{"source": "hello", "target": "bonjour"}\n')
    cfg = load_config(None, {"data": {"train": str(p), "prompt_field": "source", "reference_field": "target"}})
    assert train_rows(cfg) == [{"source": "hello", "target": "bonjour", "reference": "bonjour"}]
