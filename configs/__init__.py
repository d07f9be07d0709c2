"""Named ml-collections configs: one module per name in this folder, each with `get_config()`."""
from __future__ import annotations

import importlib
import importlib.util
import os
import pkgutil

import ml_collections

from configs.overrides import ConfigError, apply_overrides

_HERE = os.path.dirname(__file__)
_NOT_CONFIGS = {"default", "overrides"}


def available_configs() -> list[str]:
    """Names of the configs shipped in this folder."""
    names = [m.name for m in pkgutil.iter_modules([_HERE]) if not m.ispkg]
    return sorted(n for n in names if n not in _NOT_CONFIGS and not n.startswith("_"))


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Load a named config (e.g. "vp_toy") or a config file path defining `get_config()`."""
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        spec = importlib.util.spec_from_file_location("_user_config", name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif name_or_path in available_configs():
        module = importlib.import_module(f"configs.{name_or_path}")
    else:
        raise ConfigError(f"unknown config {name_or_path!r}; valid: {', '.join(available_configs())} "
                          "(or a path to a .py file defining get_config())")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {name_or_path!r} defines no get_config()")
    return module.get_config()


__all__ = ["available_configs", "get_config", "apply_overrides", "ConfigError"]
