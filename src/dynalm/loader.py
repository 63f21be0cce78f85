"""Load a user's callable from 'path/to/file.py:name' or 'package.module:name'.

Used for reward functions and environment factories; every failure is one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .errors import UserError


def _load_file(spec: str, what: str):
    thing = _thing(what)
    path_s, _, name = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise UserError(f"{what} file '{path_s}' not found", f"give 'path/to/file.py:{thing}'")
    mod_name = f"dynalm_user_{abs(hash(str(path.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        ispec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(ispec)
        try:
            ispec.loader.exec_module(module)
        except Exception as exc:  # the user's file failed to import
            raise UserError(f"{what} file '{path_s}' failed to import: {type(exc).__name__}: {exc}", "fix the file") from None
        sys.modules[mod_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{what} file '{path_s}' has no function '{name}'", "check the name after the colon")
    return fn


def _thing(what: str) -> str:
    return "function" if what == "reward" else "name"


def load_callable(spec: str, *, what: str = "reward"):
    """The callable `spec` names; `what` ("reward", "env factory") words the errors."""
    thing = _thing(what)
    target, sep, name = spec.rpartition(":")
    if not sep:
        raise UserError(f"{what} '{spec}' is not 'file.py:{thing}' or 'package.module:{thing}'", f"add the colon and the {thing}")
    if target.endswith(".py") or "/" in target or "\\" in target:
        return _load_file(spec, what)
    if not target:
        raise UserError(f"{what} '{spec}' names no module before the colon", f"write 'package.module:{thing}' or 'file.py:{thing}'")
    try:
        module = importlib.import_module(target)
    except Exception as exc:  # ImportError, or the user's module failing as it imports
        raise UserError(f"{what} module '{target}' cannot be imported: {type(exc).__name__}: {exc}", "check the module path") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"module '{target}' has no function '{name}'", "check the name after the colon")
    return fn
