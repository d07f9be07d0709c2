"""`--config.a.b=value` overrides, parsed to the type of the value they replace."""
from __future__ import annotations

import ast

import ml_collections

from errors import UserError


class ConfigError(UserError):
    """A config name, file or override that cannot be used."""


def _parse(text: str, current, key: str):
    if current is None:  # an optional setting (None = the default of whatever uses it): a number or a string
        if text.lower() in ("none", "null"):
            return None
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else text
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"override {key}={text!r}: expected true or false")
    if isinstance(current, (int, float)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"override {key}={text!r}: expected a number")
        if isinstance(current, int) and not float(value).is_integer():
            raise ConfigError(f"override {key}={text!r}: expected an integer")
        return type(current)(value)
    if isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"override {key}={text!r}: expected a tuple such as (1, 2, 2)") from None
        if isinstance(value, (int, float)):
            value = (value,)
        return type(current)(value)
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply "a.b=value" strings in place; unknown keys and unparsable values raise ConfigError."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"malformed override {item!r}: expected --config.KEY=VALUE")
        key, text = item.split("=", 1)
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                prefix = ".".join(parts[:depth]) or "config"
                valid = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                raise ConfigError(f"unknown config key {key!r} ({part!r} not in {prefix}; valid: {valid})")
            if depth < len(parts) - 1:
                node = node[part]
        current = node[parts[-1]]
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"override {key!r} names a group, not a value")
        node[parts[-1]] = _parse(text, current, key)
    return config
