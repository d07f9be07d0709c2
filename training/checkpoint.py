"""Checkpoints: model, EMA, optimizer, step, RNG states and the config, written atomically (temp file + rename).

File layout: one header line `SCORESDE-CHECKPOINT sha256=<64 hex digits>` followed by the `torch.save` payload;
the digest covers every byte of the payload and the header is checked byte for byte, so a flipped, missing or
added byte anywhere in the file is found on load (torch does not check its zip CRCs). Header and payload are
written together by one atomic replace. Loads use `weights_only` (no code runs), refuse non-finite model or
EMA weights and fields of the wrong type; files from before the checksum (no header) still load, with a note.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import sys
from typing import Any

import ml_collections
import numpy as np
import torch

from atomic_io import atomic_write
from errors import UserError
from training.load_errors import describe_load_error, describe_state_error, load_weights_only

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


MAGIC = b"SCORESDE-CHECKPOINT sha256="
_HEADER_SIZE = len(MAGIC) + 64 + 1
_legacy_noted = False


def weight_tensors(state: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the network weights a checkpoint holds: model, EMA shadow weights, classifier."""
    out = []
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            out += [(f"{key} weight {name!r}", t) for name, t in state[key].items() if isinstance(t, torch.Tensor)]
    ema = state.get("ema")
    if isinstance(ema, dict) and isinstance(ema.get("shadow_params"), (list, tuple)):
        out += [(f"EMA weight #{k}", t) for k, t in enumerate(ema["shadow_params"]) if isinstance(t, torch.Tensor)]
    return out


def nonfinite_weights(state: dict[str, Any]) -> list[str]:
    """Names of the weight tensors (model, EMA, classifier) that hold NaN or infinite values."""
    return [name for name, t in weight_tensors(state)
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically with a checksum header: a temp file in the same folder, fsync, then
    os.replace. Non-finite model / EMA weights are never written (UserError); if anything fails before the
    rename, the previous checkpoint at `path` is left as it was.
    """
    bad = nonfinite_weights(state)
    if bad:
        raise UserError(f"refusing to write {path}: {len(bad)} weight tensor(s) hold NaN/inf ({bad[0]}, ...)")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getbuffer()
    header = MAGIC + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n"

    def write(handle) -> None:
        handle.write(header)
        handle.write(payload)

    atomic_write(path, write)


def stored_digest(path: str) -> str | None:
    """The SHA-256 a checksummed file carries in its first line (what identifies the weights), or None for a file
    without one or that cannot be read."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER_SIZE)
    except OSError:
        return None
    if not header.startswith(MAGIC) or not header.endswith(b"\n") or len(header) != _HEADER_SIZE:
        return None
    return header[len(MAGIC):-1].decode("ascii", errors="replace")


class _Unverified(io.BytesIO):
    """The bytes of a file without a checksum (written before checksums were added, or not ours)."""


def _verified_source(path: str, what: str = "checkpoint") -> io.BytesIO:
    """The payload of a checksummed file after checking its digest (an `_Unverified` buffer of the whole file
    for a file without one: torch.load then says whether it is a checkpoint at all)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise UserError(f"cannot read {what} {path}: {os.strerror(error.errno).lower()}") from None
    head = data[:len(MAGIC)]
    if sum(x == y for x, y in zip(head, MAGIC)) < len(MAGIC) - 4:  # a few flipped header bytes are still ours
        return _Unverified(data)
    header, payload = data[:_HEADER_SIZE], memoryview(data)[_HEADER_SIZE:]
    stored = header[len(MAGIC):-1]
    if (not header.startswith(MAGIC) or not header.endswith(b"\n")
            or stored != hashlib.sha256(payload).hexdigest().encode("ascii")):
        raise UserError(f"{what} {path} is damaged: its content does not match the checksum stored in it "
                        "(altered or truncated); delete it or restore a copy")
    return io.BytesIO(payload)


def _note_unverified(source: io.BytesIO, path: str, what: str) -> None:
    """Say once per process, on stderr, that a file without a checksum was loaded unverified."""
    global _legacy_noted
    if isinstance(source, _Unverified) and not _legacy_noted:
        print(f"note: {what} {path} has no checksum (written before checksums were added); it was loaded "
              "unverified and gets one when it is next saved", file=sys.stderr)
        _legacy_noted = True


def _check_weights(state: dict[str, Any], path: str, what: str = "checkpoint") -> None:
    bad = nonfinite_weights(state)
    if bad:
        raise UserError(f"{what} {path} holds NaN/inf in {len(bad)} weight tensor(s) ({bad[0]}, ...); it cannot "
                        "be used: delete it or restore an earlier copy")


def _check_fields(state: dict[str, Any], path: str) -> None:
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint {path}: field 'step' must be a non-negative integer, got {step!r}")
    try:
        config = json.loads(state["config"]) if isinstance(state["config"], str) else None
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise UserError(f"checkpoint {path}: field 'config' must be the run's config as JSON text")
    for key in ("model", "ema", "optimizer"):
        if not isinstance(state[key], dict):
            raise UserError(f"checkpoint {path}: field {key!r} must be a state dict, got {type(state[key]).__name__}")


def read_verified(path: str, what: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A dict saved by `save_checkpoint` (e.g. the classifier): checksum verified, weights_only, finite weights."""
    if not os.path.isfile(path):
        raise UserError(f"no {what} at {path}")
    source = _verified_source(path, what)
    try:
        state = load_weights_only(source, map_location)
    except Exception as error:  # torch raises many types for damaged or foreign files
        raise UserError(f"{what} {path} is corrupt or not a {what} of this toolkit: {describe_load_error(error)}"
                        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{what} {path} is not a {what} of this toolkit (holds {type(state).__name__})")
    _check_weights(state, path, what)
    _note_unverified(source, path, what)
    return state


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; a missing, unreadable or incomplete file is a UserError."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}; train first with --mode train")
    source = _verified_source(path)  # checksum of the content (files from before checksums: unverified bytes)
    try:
        state = load_weights_only(source, map_location)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint of this toolkit: "
                        f"{describe_load_error(error)}; delete it to start over or point --workdir elsewhere") from None
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
        raise UserError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); "
                        "delete it to start over or point --workdir elsewhere")
    if state["format"] != FORMAT_VERSION:
        raise UserError(f"checkpoint {path} has format {state['format']}, this toolkit reads format {FORMAT_VERSION}")
    _check_fields(state, path)
    _check_weights(state, path)
    _note_unverified(source, path, "checkpoint")
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
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as error:
        raise UserError(f"checkpoint {path} does not fit the network of this config "
                        f"({describe_state_error(error)})") from None
    model = model.to(device)
    model.eval()
    return model, int(state["step"])
