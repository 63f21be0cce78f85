"""Prompt data: built-in task files, JSONL or CSV, with clear errors for malformed rows."""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path

from .errors import UserError


def builtin_path(name: str) -> Path:
    p = Path(str(resources.files("dynalm.tasks") / "data" / f"{name}.jsonl"))
    if not p.is_file():
        avail = sorted(x.stem for x in p.parent.glob("*.jsonl"))
        raise UserError(f"no built-in data set '{name}'", f"available: {', '.join('builtin:' + a for a in avail)}")
    return p


def read_rows(spec: str, prompt_field: str = "prompt", split: str = "train") -> list[dict]:
    """Rows from 'builtin:NAME', a .jsonl or .csv file, a `datasets` folder (save_to_disk) or
    'hf:NAME[:CONFIG]' (the hub, for online users); every row needs `prompt_field`.

    Any malformed input raises a UserError naming the file (and line); never another exception.
    """
    if spec.startswith("hf:") or (Path(spec).is_dir() and not spec.startswith("builtin:")):
        return _read_datasets(spec, prompt_field, split)
    path = builtin_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec)
    if not path.is_file():
        raise UserError(f"data file '{spec}' not found", "check the path in data.train / data.eval")
    text = read_text(spec, path)
    rows = _read_csv(spec, text, prompt_field) if path.suffix.lower() == ".csv" else _read_jsonl(spec, text, prompt_field)
    if not rows:
        raise UserError(f"data set '{spec}' is empty", "give at least one row")
    return rows


def _read_datasets(spec: str, prompt_field: str, split: str) -> list[dict]:
    """A Hugging Face `datasets` source: a save_to_disk folder, or a hub name (online)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"data '{spec}' needs the `datasets` package", "run: pip install datasets") from None
    try:
        if spec.startswith("hf:"):
            name, _, config = spec[3:].partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
        else:
            ds = datasets.load_from_disk(spec)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"data '{spec}' has no split '{split}'", f"its splits: {', '.join(ds)}; set data.train_split / data.eval_split")
                ds = ds[split]
    except UserError:
        raise
    except Exception as exc:  # network, missing data set, bad folder: one line, no traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"could not load data '{spec}' (split '{split}'): {first}", "check the name, the split, or your network") from None
    if prompt_field not in ds.column_names:
        raise UserError(f"data '{spec}' has no column '{prompt_field}'", f"its columns: {', '.join(ds.column_names)}; set data.prompt_field")
    rows = [dict(r) for r in ds]
    for i, row in enumerate(rows, start=1):
        _check_row(spec, i, row, prompt_field)
    if not rows:
        raise UserError(f"data set '{spec}' is empty", "give at least one row")
    return rows


def _read_csv(spec: str, text: str, prompt_field: str) -> list[dict]:
    rows: list[dict] = []
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None:
            raise UserError(f"{spec}: the CSV file has no header row", f"put the column names, with '{prompt_field}', on line 1")
        if prompt_field not in reader.fieldnames:
            # repr() keeps the message on one line whatever the header holds
            cols = ", ".join(repr(c) for c in reader.fieldnames[:10])
            raise UserError(
                f"{spec}: the CSV header has no column '{prompt_field}'",
                f"its columns are {cols}: rename one or set data.prompt_field",
            )
        for row in reader:
            if None in row:  # DictReader files surplus fields under the key None
                raise UserError(
                    f"{spec}: line {reader.line_num} has more fields than the header's {len(reader.fieldnames)}",
                    "quote fields that contain commas",
                )
            _check_row(spec, reader.line_num, row, prompt_field)
            rows.append(dict(row))
    except csv.Error as exc:  # NUL bytes, an over-long field, ...
        raise UserError(f"{spec}: line {reader.line_num} is not valid CSV ({_one_line(exc)})", "fix that line") from None
    return rows


def read_text(spec: str, path: Path) -> str:
    """A data file's text; a byte that is not UTF-8 is a UserError naming its line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # -sig: spreadsheets often write a byte-order mark
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{spec}: line {line} is not UTF-8 text", "save the file as UTF-8") from None


def jsonl_objects(spec: str, text: str):
    """Yield (line number, object) for each non-blank JSONL line; anything else is a UserError."""
    # universal newlines, as a file opened in text mode: split on \n, \r and \r\n only
    for i, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{spec}: line {i} is not valid JSON ({exc.msg})", "fix that line") from None
        except RecursionError:
            raise UserError(f"{spec}: line {i} is not valid JSON (nested too deeply)", "fix that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{spec}: line {i} is not a JSON object", "write one {...} per line")
        yield i, row


def _read_jsonl(spec: str, text: str, prompt_field: str) -> list[dict]:
    rows: list[dict] = []
    for i, row in jsonl_objects(spec, text):
        _check_row(spec, i, row, prompt_field)
        rows.append(row)
    return rows


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def is_messages(v) -> bool:
    """A prompt in TRL's conversational format: a non-empty list of {role, content} messages."""
    return (
        isinstance(v, list) and bool(v)
        and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v)
    )


def prompt_text(row: dict, prompt_field: str) -> str:
    """The prompt as text: itself, or a conversation's last user message (what reward functions get as `prompts`)."""
    v = row[prompt_field]
    if is_messages(v):
        return next((m["content"] for m in reversed(v) if m["role"] == "user"), v[-1]["content"])
    return str(v)


def _check_row(spec: str, line: int, row: dict, field: str) -> None:
    if field not in row:
        raise UserError(f"{spec}: line {line} has no field '{field}'", "add it or set data.prompt_field")
    v = row[field]
    if not is_messages(v) and (not isinstance(v, str) or not v.strip()):
        raise UserError(
            f"{spec}: line {line}: field '{field}' must be a non-empty string or a list of chat messages", "fix that line"
        )


def render_template(template: str, row: dict, prompt_field: str) -> str:
    try:
        return template.format(**{**row, "prompt": row[prompt_field]})
    except KeyError as exc:
        raise UserError(f"data.template names field {exc} that the rows lack", "fix data.template") from None
