"""Checkpoints: model, EMA, optimizer, step, RNG states and the config, written atomically (temp file + rename)."""
from __future__ import annotations

import json
import os
import random
from typing import Any

import ml_collections
import numpy as np
import torch

from atomic_io import atomic_write
from errors import UserError
from training.load_errors import describe_load_error

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "model", "ema", "optimizer", "step", "config")

# Keys that may change between a run and its resumption without changing what is being trained.
RESUMABLE_CHANGES = ("training.n_iters", "training.log_every", "training.snapshot_every", "training.sample_every",
                     "training.compile", "training.progress", "training.plot_samples", "training.data_on_device",
                     "data.path", "device")
# Sections that do not affect training at all (sampling and likelihood settings are read at use time;
# the classifier of classifier guidance is trained separately, training/classifier.py).
IGNORED_SECTIONS = ("sampling", "likelihood", "eval", "classifier")


def checkpoint_dir(workdir: str) -> str:
    """Folder holding the checkpoint of a run."""
    return os.path.join(workdir, "checkpoints")


def checkpoint_path(workdir: str) -> str:
    """Path of the latest checkpoint of a run."""
    return os.path.join(checkpoint_dir(workdir), CHECKPOINT_NAME)


def rng_state() -> dict[str, Any]:
    """Global RNG states (torch CPU, CUDA, numpy, python) as plain tensors and numbers."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically: a temp file in the same folder, fsync, then os.replace.

    If anything fails before the rename, the previous checkpoint at `path` is left as it was.
    """
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; a missing, unreadable or incomplete file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train first with --mode train")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this toolkit: "
                        f"{describe_load_error(error)}; delete it to start over or point --workdir elsewhere") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise UserError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                        "delete it to start over or point --workdir elsewhere")
    if state["format"] != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state['format']}, this toolkit reads format {FORMAT_VERSION}")
    return state


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as JSON text (stored in checkpoints and next to them)."""
    return config.to_json(sort_keys=True)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, tuple):
        tree = list(tree)
    return {prefix[:-1]: tree}


def config_differences(saved_json: str, config: ml_collections.ConfigDict,
                       sections: tuple[str, ...] | None = None) -> list[str]:
    """Keys whose values differ between a saved config and `config` ("key: saved -> now"), ignoring
    settings that do not change the training run (RESUMABLE_CHANGES, IGNORED_SECTIONS) and keys the saved
    config does not have (added to the toolkit later).
    With `sections`, only keys under those top-level sections are compared."""
    saved = _flatten(json.loads(saved_json))
    current = _flatten(json.loads(config_to_json(config)))
    diffs = []
    for key in sorted(set(saved) | set(current)):
        top = key.split(".")[0]
        if key in RESUMABLE_CHANGES or top in IGNORED_SECTIONS:
            continue
        if sections is not None and top not in sections:
            continue
        if key not in saved:  # a key added to the toolkit after the checkpoint was written
            continue
        a, b = saved[key], current.get(key, "<absent>")
        if a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


# What fixes the trained network and its score conversion (with the model and sde sections); other data /
# training keys, and sampling / likelihood / eval settings, may differ at use time.
NETWORK_KEYS = ("data.dim", "data.image_size", "data.num_channels", "data.centered", "data.num_classes",
                "training.continuous")


def network_differences(saved_json: str, config: ml_collections.ConfigDict) -> list[str]:
    """Differences ("key: saved -> now") between a run's saved config and `config` in what fixes the network."""
    diffs = [d for d in config_differences(saved_json, config, sections=("data", "model", "sde", "training"))
             if d.split(":")[0] in NETWORK_KEYS or d.split(".")[0] in ("model", "sde")]
    return [d for d in diffs if not d.startswith("model.ema_rate")]


def restore_model(config, workdir: str, device: str | torch.device, use_ema: bool = True):
    """The trained network of a run in eval mode (EMA weights by default) and its training step.

    Raises UserError when the run has no checkpoint, the checkpoint is corrupt, or the model settings in
    `config` differ from those it was trained with.
    """
    import models

    path = checkpoint_path(workdir)
    state = load_checkpoint(path, map_location="cpu")
    diffs = network_differences(state["config"], config)
    if diffs:
        raise UserError(f"checkpoint {path} was trained with different settings: {'; '.join(diffs[:6])}")
    model = models.create_model(config)
    try:
        model.load_state_dict(state["model"])
        if use_ema:
            ema = models.ExponentialMovingAverage(model, float(config.model.ema_rate))
            ema.load_state_dict(state["ema"])
            ema.copy_to(model)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"checkpoint {path} does not fit the network of this config "
                        f"({str(error).splitlines()[0][:200]})") from None
    model = model.to(device)
    model.eval()
    return model, int(state["step"])
