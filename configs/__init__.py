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


def _tuples(tree):
    """JSON lists back to the tuples the configs use (e.g. model.ch_mult)."""
    if isinstance(tree, dict):
        return {key: _tuples(value) for key, value in tree.items()}
    return tuple(_tuples(v) for v in tree) if isinstance(tree, list) else tree


def _kind(value) -> str:
    """The kind of a config value that must agree between a saved config and the defaults."""
    if isinstance(value, dict):
        return "a section"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    return "text" if isinstance(value, str) else "other"


def _merge(base: dict, saved: dict, source: str, prefix: str = "") -> dict:
    merged = dict(base)
    for key, value in saved.items():
        default = base.get(key)
        if default is not None and value is not None and {_kind(default), _kind(value)} & {
                "a section", "true/false", "text"} and _kind(default) != _kind(value):
            raise ConfigError(f"{source}: {prefix}{key} must be {_kind(default)} (as in the defaults), got {value!r}"
                              [:300])
        merged[key] = (_merge(default, value, source, f"{prefix}{key}.") if isinstance(value, dict)
                       and isinstance(default, dict) else value)
    return merged


def config_from_json(text: str, source: str = "config") -> ml_collections.ConfigDict:
    """A config saved as JSON text on top of the shared defaults (keys added to the toolkit since it was saved
    get their default values)."""
    import json

    from configs.default import get_default_config

    try:
        saved = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{source} is not valid JSON: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{source} is not a JSON object of config sections")
    return ml_collections.ConfigDict(_merge(get_default_config().to_dict(), _tuples(saved), source))


def load_json_config(path: str) -> ml_collections.ConfigDict:
    """A config saved as a JSON file (a run's `config.json`); see `config_from_json`."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config {path!r}: {str(error).splitlines()[0][:200]}") from None
    return config_from_json(text, f"config {path!r}")


def get_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Load a named config (e.g. "vp_toy"), a config file path defining `get_config()`, or a JSON config (a run's
    `config.json`)."""
    if name_or_path.endswith(".json"):
        if not os.path.isfile(name_or_path):
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return load_json_config(name_or_path)
    if name_or_path.endswith(".py") or os.sep in name_or_path:
        if os.path.isdir(name_or_path):
            raise ConfigError(f"config {name_or_path!r} is a folder; expected a config name, a .py file defining "
                              "get_config() or a run's config.json")
        if not os.path.isfile(name_or_path):
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        if not name_or_path.endswith(".py"):
            raise ConfigError(f"config file {name_or_path!r} is neither a .py file defining get_config() nor a "
                              ".json config")
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


__all__ = ["available_configs", "get_config", "load_json_config", "config_from_json", "apply_overrides", "ConfigError"]
