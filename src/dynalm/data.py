"""Prompt data: built-in task files, JSONL or CSV, with clear errors for malformed rows."""

from __future__ import annotations

import csv
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


def read_rows(spec: str, prompt_field: str = "prompt") -> list[dict]:
    """Rows from 'builtin:NAME', a .jsonl file or a .csv file; every row needs `prompt_field`."""
    path = builtin_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec)
    if not path.is_file():
        raise UserError(f"data file '{spec}' not found", "check the path in data.train / data.eval")
    rows: list[dict] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None or prompt_field not in reader.fieldnames:
                    raise UserError(f"{spec}: the CSV header has no column '{prompt_field}'", "set data.prompt_field")
                for i, row in enumerate(reader, start=2):
                    _check_row(spec, i, row, prompt_field)
                    rows.append(dict(row))
        else:
            with path.open(encoding="utf-8") as fh:
                for i, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{spec}: line {i} is not valid JSON ({exc.msg})", "fix that line") from None
                    if not isinstance(row, dict):
                        raise UserError(f"{spec}: line {i} is not a JSON object", "write one {...} per line")
                    _check_row(spec, i, row, prompt_field)
                    rows.append(row)
    except UnicodeDecodeError:
        raise UserError(f"{spec}: not UTF-8 text", "save the file as UTF-8") from None
    if not rows:
        raise UserError(f"data set '{spec}' is empty", "give at least one row")
    return rows


def _check_row(spec: str, line: int, row: dict, field: str) -> None:
    if field not in row:
        raise UserError(f"{spec}: line {line} has no field '{field}'", "add it or set data.prompt_field")
    v = row[field]
    if not isinstance(v, str) or not v.strip():
        raise UserError(f"{spec}: line {line}: field '{field}' must be a non-empty string", "fix that line")


def render_template(template: str, row: dict, prompt_field: str) -> str:
    try:
        return template.format(**{**row, "prompt": row[prompt_field]})
    except KeyError as exc:
        raise UserError(f"data.template names field {exc} that the rows lack", "fix data.template") from None
