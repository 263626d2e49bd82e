"""Loading the user's functions named in a recipe as `module:function` or `path/to/file.py:function`."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Callable


class PluginLoadError(ValueError):
    """A recipe names a function that cannot be loaded; the message says which part failed."""


def load_function(spec: str, key: str) -> Callable:
    """Import the function `spec` names; `key` is the recipe key it came from, for error messages."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise PluginLoadError(f"{key} = {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.exists():
            raise PluginLoadError(f"{key} = {spec!r}: file {path} not found")
        mod_name = f"streamrl_plugin_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert module_spec and module_spec.loader
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise PluginLoadError(f"{key} = {spec!r}: importing {path} failed: {exc!r}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise PluginLoadError(f"{key} = {spec!r}: cannot import module {target!r}: {exc!r}") from exc
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        public = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")]
        raise PluginLoadError(f"{key} = {spec!r}: {target} has no function {name!r}; it has: {', '.join(public)}")
    return fn
