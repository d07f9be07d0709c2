"""Names of result files: a readable stem plus a short hash of every setting that changes the result.

`result_stem(stem, settings, defaults)` keeps the readable stem (e.g. `samples_em_nfe500_seed42`) when every
setting beyond it has its default value, and appends `_h` + 8 hex digits of the SHA-256 of the full settings
(JSON, sorted keys) otherwise. So results made with other settings never overwrite each other, and the full
settings are recorded in the JSON written beside each result.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any


def settings_hash(settings: dict[str, Any]) -> str:
    """8 hex digits of the SHA-256 of `settings` as sorted-key JSON."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def result_stem(stem: str, settings: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    """`stem` if `settings` equal `defaults` (the settings beyond the stem at their default values), else
    `stem_h<hash of settings>`; `defaults=None` (no defaults known) always appends the hash."""
    if defaults is not None and settings == defaults:
        return stem
    return f"{stem}_h{settings_hash(settings)}"


def default_config(args, workdir: str):
    """The config a command starts from before overrides (for `result_stem` defaults): the run's saved config
    when `workdir` holds one (what main.py uses then), else the named config of `args.config`; or None."""
    import configs
    from errors import UserError
    from evaluation.run import saved_config

    try:
        saved = saved_config(workdir)
    except UserError:
        saved = None
    if saved is not None:
        return saved
    name = getattr(args, "config", None)
    if not name:
        return None
    try:
        return configs.get_config(str(name))
    except UserError:  # a config that cannot be rebuilt: names always carry the hash
        return None


def file_digest(path: str | None) -> str | None:
    """The first 12 hex digits of a file's SHA-256 (inputs are settings of controllable outputs), or None."""
    if not path or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]
