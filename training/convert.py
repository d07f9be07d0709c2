"""Convert a checkpoint of the reference PyTorch code of Song et al. (2021) into one of our checkpoints.

The reference (`score_sde_pytorch`) saves `{"model", "ema", "optimizer", "step"}`: the DataParallel state dict
(names under "module."), the EMA as `{"decay", "num_updates", "shadow_params"}` with one shadow tensor per
*trainable* parameter in registration order, and Adam's state keyed by parameter position. Our networks use
the reference's module and parameter names (docs/MODELS.md), so the model maps name by name. The EMA and the
optimizer are lists by position; their positions are read off the order of the source state dict itself (a
state dict lists parameters in registration order), so they map by name too and never depend on our
networks registering their parameters in the reference's order.

Every check is strict: each source tensor is used exactly once, each of our tensors is filled, shapes are
equal and values finite; any mismatch is a `UserError` naming the tensor. The only source entry that is not
copied is the reference's `sigmas` buffer (its table of noise levels): our VE networks receive sigma itself,
so it is checked against the config's VE noise levels instead.

The file is read with `torch.load(weights_only=True)` and an explicit allowlist of the only non-tensor objects
the reference's files hold: the numpy float64 learning rate that its warm-up writes into Adam's param group
(`lr * np.minimum(step / warmup, 1.0)`), pickled as `numpy.core.multiarray.scalar` (numpy 1.x) or
`numpy._core.multiarray.scalar` (numpy 2.x) with a `numpy.dtype`. Nothing else is accepted, and loading never
runs code from the file. What the file cannot tell (same network, other SDE or training) is listed by
`unverified_settings`.

This lives in `training/` because it writes our checkpoint format through `training.checkpoint`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from atomic_io import write_text
from errors import UserError
from training.load_errors import describe_load_error, describe_state_error, load_weights_only

DATAPARALLEL_PREFIX = "module."
REFERENCE_KEYS = ("model", "ema", "optimizer", "step")
# Reference buffers that carry no weights: the noise-level table sigma_max..sigma_min (N entries).
REFERENCE_BUFFERS = ("sigmas",)
_MAX_LISTED = 5


@dataclasses.dataclass
class ConversionReport:
    """What `convert_checkpoint` did."""

    path: str  # our checkpoint
    step: int
    num_tensors: int  # model tensors copied
    num_shadow: int  # EMA shadow tensors copied
    num_optimizer_states: int  # Adam per-parameter states carried over
    checked_buffers: list[str]  # reference buffers checked and not copied
    num_parameters: int
    unverified: list[str]  # settings taken from the config that the file cannot confirm


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def reference_safe_globals() -> list[tuple[Any, str]]:
    """The allowlist for reference files: numpy's scalar constructor under both module paths, `numpy.dtype`,
    and the float64 dtype class (numpy 2.x builds the dtype through it)."""
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar
    allowed = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
               (np.dtype, "numpy.dtype")]
    float64_dtype = type(np.dtype(np.float64))
    if float64_dtype is not np.dtype:  # numpy >= 1.25: numpy.dtypes.Float64DType
        allowed.append((float64_dtype, "numpy.dtypes.Float64DType"))
    return allowed


def _plain(value: Any) -> Any:
    """numpy scalars (the reference's learning rate) as Python numbers, in nested dicts, lists and tuples."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):  # dict or OrderedDict: order kept
        return type(value)((k, _plain(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def load_reference_checkpoint(path: str) -> dict[str, Any]:
    """Read a reference checkpoint (tensors, plain values and numpy float64 scalars only); a missing or
    foreign file is a UserError in one line."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals(reference_safe_globals()):
            state = load_weights_only(path)
    except Exception as error:  # torch raises many types for files that are not torch checkpoints
        raise UserError(f"{path} is not a readable PyTorch checkpoint: {describe_load_error(error)}") from None
    state = _plain(state)
    if not isinstance(state, Mapping):
        raise UserError(f"{path} is not a Score-SDE checkpoint: it holds a {type(state).__name__}, "
                        f"expected a dict with keys {', '.join(REFERENCE_KEYS)}")
    missing = [key for key in REFERENCE_KEYS if key not in state]
    if missing:
        hint = " (it looks like a bare state dict; the EMA weights are needed)" if all(
            isinstance(v, torch.Tensor) for v in state.values()) and state else ""
        raise UserError(f"{path} is not a Score-SDE checkpoint: missing {', '.join(missing)} "
                        f"(expected keys {', '.join(REFERENCE_KEYS)}){hint}")
    if not isinstance(state["model"], Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise UserError(f"{path}: 'model' is not a state dict of named tensors")
    ema = state["ema"]
    if not isinstance(ema, Mapping) or not isinstance(ema.get("shadow_params"), (list, tuple)):
        raise UserError(f"{path}: 'ema' is not an EMA state (expected a dict with a 'shadow_params' list)")
    return dict(state)


def strip_dataparallel(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's "module." prefix (all names carry it, or none does)."""
    prefixed = [k.startswith(DATAPARALLEL_PREFIX) for k in state]
    if any(prefixed) and not all(prefixed):
        odd = [k for k in state if not k.startswith(DATAPARALLEL_PREFIX)]
        raise UserError(f"the checkpoint mixes names with and without the {DATAPARALLEL_PREFIX!r} prefix "
                        f"(e.g. {_listing(odd)})")
    if prefixed and all(prefixed):
        return {k[len(DATAPARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def reference_sigmas(config) -> torch.Tensor:
    """The reference's noise-level table: N sigmas geometric from sigma_max down to sigma_min (float64)."""
    smin, smax, n = float(config.sde.sigma_min), float(config.sde.sigma_max), int(config.sde.num_scales)
    return torch.exp(torch.linspace(math.log(smax), math.log(smin), n, dtype=torch.float64))


def _check_buffer(name: str, tensor: torch.Tensor, config, config_name: str) -> None:
    """The `sigmas` table must have N entries; for the VE SDE it must be the config's noise levels."""
    n = int(config.sde.num_scales)
    if tensor.ndim != 1 or tensor.shape[0] != n:
        raise UserError(f"reference buffer {name} has shape {_shape(tensor)}, config {config_name} has "
                        f"sde.num_scales={n}: the checkpoint was trained with other settings")
    if str(config.sde.name).lower() == "vesde":
        expected = reference_sigmas(config)
        if not torch.allclose(tensor.double(), expected, rtol=1e-5, atol=0.0):
            raise UserError(f"reference buffer {name} (noise levels {float(tensor.max()):.4g}..{float(tensor.min()):.4g})"
                            f" differs from config {config_name} (sde.sigma_max={config.sde.sigma_max}, "
                            f"sde.sigma_min={config.sde.sigma_min}): the checkpoint was trained with another VE SDE")


def _checked(name: str, source: torch.Tensor, target_shape: tuple[int, ...], what: str,
             config_name: str) -> torch.Tensor:
    if _shape(source) != target_shape:
        raise UserError(f"{what} {name} has shape {_shape(source)} in the checkpoint, the network of config "
                        f"{config_name} expects {target_shape}: is --config the one the checkpoint was trained with?")
    if not source.is_floating_point():
        raise UserError(f"{what} {name} has dtype {source.dtype}, expected floating point")
    if not torch.isfinite(source).all():
        raise UserError(f"{what} {name} holds NaN or infinite values; the checkpoint is damaged")
    return source.detach().to(torch.float32).clone()


def map_model_state(source: Mapping[str, torch.Tensor], model: nn.Module, config,
                    config_name: str = "") -> tuple[dict[str, torch.Tensor], list[str]]:
    """Our state dict from a (prefix-free) reference state dict; returns (state, reference buffers checked)."""
    target = model.state_dict()
    missing = [k for k in target if k not in source]
    extra = [k for k in source if k not in target and k not in REFERENCE_BUFFERS]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} tensor(s) of the network are missing in the checkpoint: {_listing(missing)}")
        if extra:
            parts.append(f"{len(extra)} checkpoint tensor(s) have no place in the network: {_listing(extra)}")
        raise UserError(f"the checkpoint does not fit config {config_name}: {'; '.join(parts)}. "
                        "Is --config the one the checkpoint was trained with?")
    state = {name: _checked(name, source[name], _shape(ref), "tensor", config_name) for name, ref in target.items()}
    buffers = [k for k in source if k in REFERENCE_BUFFERS]
    for name in buffers:
        _check_buffer(name, source[name], config, config_name)
    return state, buffers


def reference_parameter_names(source: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[list[str], list[str]]:
    """(all parameters, trainable parameters) of the reference network in its registration order.

    A state dict lists each module's parameters in the order they were registered, so the source dict's own
    order is the order of `model.parameters()` in the reference, minus its buffers. Which parameters are fixed
    (the Gaussian Fourier W) is the same in both networks, since they share names and modules.
    """
    fixed = {name for name, p in model.named_parameters() if not p.requires_grad}
    params = [k for k in source if k not in REFERENCE_BUFFERS]
    return params, [k for k in params if k not in fixed]


def map_ema(source_ema: Mapping[str, Any], trainable_names: list[str], model: nn.Module,
            config_name: str = "") -> dict[str, Any]:
    """Our EMA state (shadow tensors in our trainable-parameter order) from the reference EMA state."""
    shadow = list(source_ema["shadow_params"])
    if len(shadow) != len(trainable_names):
        raise UserError(f"the checkpoint's EMA holds {len(shadow)} shadow tensors but its model has "
                        f"{len(trainable_names)} trainable parameters; the EMA does not belong to this model")
    by_name = {}
    for index, (name, tensor) in enumerate(zip(trainable_names, shadow)):
        if not isinstance(tensor, torch.Tensor):
            raise UserError(f"EMA shadow_params[{index}] ({name}) is a {type(tensor).__name__}, not a tensor")
        by_name[name] = tensor
    ours = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = {name: _shape(p) for name, p in model.named_parameters()}
    shadow_params = [_checked(f"shadow_params[{trainable_names.index(name)}] ({name})", by_name[name],
                              shapes[name], "EMA tensor", config_name) for name in ours]
    decay = float(source_ema.get("decay", 0.0))
    num_updates = source_ema.get("num_updates")
    return {"decay": decay, "num_updates": None if num_updates is None else int(num_updates),
            "shadow_params": shadow_params}


def map_optimizer(source_opt: Any, param_names: list[str], model: nn.Module,
                  config_name: str = "") -> tuple[dict[str, Any], int]:
    """Adam's state re-indexed from the reference's parameter positions to ours (one parameter group)."""
    if not isinstance(source_opt, Mapping) or "state" not in source_opt or "param_groups" not in source_opt:
        raise UserError("the checkpoint's 'optimizer' is not an optimizer state dict (expected state, param_groups)")
    groups = source_opt["param_groups"]
    if len(groups) != 1 or len(groups[0].get("params", [])) != len(param_names):
        sizes = [len(g.get("params", [])) for g in groups]
        raise UserError(f"the checkpoint's optimizer has parameter groups of sizes {sizes}; expected one group "
                        f"over the model's {len(param_names)} parameters")
    ours = [name for name, _ in model.named_parameters()]
    our_index = {name: i for i, name in enumerate(ours)}
    shapes = {name: _shape(p) for name, p in model.named_parameters()}
    position = {pid: param_names[i] for i, pid in enumerate(groups[0]["params"])}
    state = {}
    for pid, entry in source_opt["state"].items():
        if pid not in position:
            raise UserError(f"the checkpoint's optimizer has state for parameter id {pid}, which is in no group")
        name = position[pid]
        converted = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                value = _checked(f"{key} of {name}", value, shapes[name], "optimizer tensor", config_name)
            converted[key] = value
        state[our_index[name]] = converted
    group = {k: v for k, v in groups[0].items() if k != "params"}
    group["params"] = list(range(len(ours)))
    return {"state": state, "param_groups": [group]}, len(state)


def convert_state(source: Mapping[str, Any], config, config_name: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """(our checkpoint state without the config, facts) from a loaded reference checkpoint."""
    import models
    from training.checkpoint import FORMAT_VERSION

    model = models.create_model(config)
    model_src = strip_dataparallel(source["model"])
    model_state, buffers = map_model_state(model_src, model, config, config_name)
    param_names, trainable = reference_parameter_names(model_src, model)
    ema_state = map_ema(source["ema"], trainable, model, config_name)
    optimizer_state, num_opt = map_optimizer(source["optimizer"], param_names, model, config_name)
    step = source["step"]
    step = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step) or step < 0:
        raise UserError(f"the checkpoint's 'step' must be a non-negative integer, got {step!r}"[:200])
    step = int(step)
    state = {"format": FORMAT_VERSION, "model": model_state, "ema": ema_state, "optimizer": optimizer_state,
             "step": step}
    facts = {"num_tensors": len(model_state), "num_shadow": len(ema_state["shadow_params"]),
             "num_optimizer_states": num_opt, "checked_buffers": buffers,
             "num_parameters": sum(p.numel() for p in model.parameters())}
    return state, facts


def convert_checkpoint(src: str, config, workdir: str, config_name: str = "", overwrite: bool = False
                       ) -> ConversionReport:
    """Convert the reference checkpoint `src` for `config` and write it as the checkpoint of run `workdir`.

    Afterwards `main.py --mode sample|likelihood --config <the same config> --workdir workdir` use its EMA
    weights (through `training.checkpoint.restore_model`).
    """
    from training.checkpoint import checkpoint_path, config_to_json, save_checkpoint

    out = checkpoint_path(workdir)
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --force to replace it")
    source = load_reference_checkpoint(src)
    try:
        state, facts = convert_state(source, config, config_name)
    except UserError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as error:  # hand-made or damaged entries
        raise UserError(f"{src} is not a Score-SDE checkpoint this toolkit can convert: "
                        f"{describe_state_error(error)}") from None
    state["config"] = config_to_json(config)
    unverified = unverified_settings(config, facts["checked_buffers"])
    state["converted_from"] = {"path": os.path.abspath(src), "format": "score_sde_pytorch",
                               "config": config_name, "ema_decay": state["ema"]["decay"],
                               "unverified": unverified}
    save_checkpoint(out, state)
    write_text(os.path.join(workdir, "config.json"), config_to_json(config))
    return ConversionReport(path=out, step=state["step"], unverified=unverified, **facts)


def unverified_settings(config, checked_buffers: list[str]) -> list[str]:
    """The settings of `config` that a reference file cannot confirm, so they come from the config alone.

    The file fixes the network (every tensor name and shape: DDPM / DDPM++ / NCSN++, depth, Fourier or
    positional embedding, so continuous and discrete NCSN++ differ) and, through the `sigmas` buffer, the
    number of noise levels and the VE noise levels. Networks of the VP and sub-VP SDEs are the same, and a
    discrete DDPM / DDPM++ network is the same as a continuous one (labels t (N-1) = 999 t for N = 1000).
    """
    sde = str(config.sde.name).lower()
    unverified = []
    if sde in ("vpsde", "subvpsde"):
        unverified += ["the SDE (VP and sub-VP networks are the same)",
                       "discrete or continuous training (the same network and labels)",
                       "sde.beta_min / sde.beta_max"]
    if "sigmas" not in checked_buffers:
        unverified.append("sde.num_scales" + (" and the VE noise levels" if sde == "vesde" else "")
                          + " (the file has no sigmas buffer)")
    unverified.append("the data scaling (data.centered)")
    return unverified
