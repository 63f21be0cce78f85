"""YAML and `--set` in, a validated Config out; every mistake is one UserError line that
names the key and, for an unknown one, the closest valid key."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import UserError
from .inputs import RewardTerm
from .schema import Config


def _field_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_field_paths(ann, path + "."))
    return out


def _suggest(bad: str, schema: type[BaseModel] | None = None) -> str:
    schema = schema or Config
    candidates = _field_paths(schema)
    if schema is Config:
        candidates += [f"rewards.N.{k}" for k in RewardTerm.model_fields]
    close = difflib.get_close_matches(bad, candidates, n=1, cutoff=0.5)
    if not close:  # try matching only the last component within the same section
        section, _, leaf = bad.rpartition(".")
        leaves = [c for c in candidates if c.rpartition(".")[0] == section]
        close = difflib.get_close_matches(bad, leaves, n=1, cutoff=0.3)
    return f"did you mean '{close[0]}'?" if close else "run `dynalm config` to see every valid key"


def format_validation_error(err: ValidationError, schema: type[BaseModel] | None = None) -> UserError:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        generic = ".".join("N" if str(p).isdigit() else str(p) for p in e["loc"])
        return UserError(f"unknown config key '{loc}'", _suggest(generic, schema))
    if e["type"] == "missing":
        return UserError(f"config key '{loc}' is required", "add it to the config or pass --set")
    msg = e["msg"].removeprefix("Value error, ")
    if loc:
        got = e.get("input")
        got_s = f", got {got!r}" if not isinstance(got, (dict, list)) else ""
        return UserError(f"config key '{loc}': {msg}{got_s}", "fix the value in the config or with --set")
    return UserError(f"invalid config: {msg}", "fix the config")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """Turn `['a.b=1', 'c=x']` into a nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set '{item}' is not key=value", "write e.g. --set train.steps=10")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set '{item}' conflicts with another --set", "set each key once")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        elif k == "rewards" and isinstance(v, dict) and isinstance(out.get(k), list):
            # --set rewards.0.weight=2 addresses list items by index
            items = list(out[k])
            for idx, sub in v.items():
                i = int(idx) if str(idx).lstrip("-").isdigit() else -1
                if not 0 <= i < len(items):
                    raise UserError(f"--set rewards.{idx}: there are {len(items)} reward terms", "use an index in range")
                items[i] = deep_merge(items[i], sub) if isinstance(sub, dict) else sub
            out[k] = items
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{path}' not found", "check the path, e.g. configs/story.yaml")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"config file '{path}' is not valid YAML: {first}", "fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level", "write key: value pairs")
    return data


def build_config(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise format_validation_error(err) from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Load a YAML config (or the defaults), apply `--set` style overrides, validate."""
    raw = read_yaml(path) if path else {}
    over = overrides if isinstance(overrides, dict) else parse_set(overrides)
    return build_config(deep_merge(raw, over))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
