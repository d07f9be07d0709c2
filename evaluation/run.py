"""A finished run, reloaded from its folder: `load_run(workdir)` gives its config, SDE, EMA network and score
function; `resolve_config` is the command line's rule for which config a command uses.

    from evaluation import load_run
    run = load_run("runs/toy")                       # config from runs/toy/config.json, EMA weights
    x, nfe = solvers.sample(run.sde, run.score_fn, (1000, 2), solver="em", nfe=500)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import ml_collections
import torch
from torch import nn

import configs
from errors import UserError

CONFIG_NAME = "config.json"


@dataclasses.dataclass
class Run:
    """A trained run: `score_fn(x, t)` is the EMA network's score (parameters frozen, eval mode)."""

    workdir: str
    config: ml_collections.ConfigDict
    sde: object
    model: nn.Module
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    step: int  # training steps of the checkpoint
    device: torch.device


def saved_config(workdir: str) -> ml_collections.ConfigDict | None:
    """The config a run was trained with (`workdir/config.json`, else the checkpoint's copy); None if no run.

    `device` is reset to "auto": a run trained on a GPU machine loads on a CPU one (override it with --device).
    """
    from training.checkpoint import checkpoint_path, load_checkpoint

    path = os.path.join(workdir, CONFIG_NAME)
    if os.path.isfile(path):
        config = configs.load_json_config(path)
    elif os.path.isfile(checkpoint_path(workdir)):
        text = load_checkpoint(checkpoint_path(workdir))["config"]
        config = configs.config_from_json(str(text), f"the config in {checkpoint_path(workdir)}")
    else:
        return None
    config.device = "auto"
    return config


def load_run(workdir: str, device: str | torch.device | None = None,
             config: ml_collections.ConfigDict | None = None) -> Run:
    """The run in `workdir` with its EMA weights on `device` (None: config.device, "auto" = CUDA if present).

    `config` (default: the run's saved config) may change use-time settings (sampling, likelihood, data.path ...);
    one that changes the trained network is refused in one line.
    """
    import models
    from sde_lib import get_sde
    from training.checkpoint import restore_model
    from training.device import get_device

    if config is None:
        config = saved_config(workdir)
        if config is None:
            raise UserError(f"{workdir!r} holds no run (no {CONFIG_NAME} or checkpoints/checkpoint.pt); "
                            "train one with main.py --mode train --workdir DIR")
    if device is not None:
        config.device = str(device)
    device = get_device(config)
    sde = get_sde(config)
    model, step = restore_model(config, workdir, device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # use-time: no gradients w.r.t. the weights (the likelihood needs x only)
    score_fn = models.get_score_fn(sde, model, continuous=bool(config.training.continuous),
                                   **models.score_fn_options(config))
    return Run(workdir, config, sde, model, score_fn, step, device)


_FIRST = ("model.name", "data.dataset", "sde.name", "data.kind")  # the differences that explain the others


def _network_diffs(config_json: str, config) -> list[str]:
    from training.checkpoint import network_differences

    return sorted(network_differences(config_json, config), key=lambda d: not d.startswith(_FIRST))


def _listed(diffs: list[str], shown: int = 4) -> str:
    """The first `shown` differences, and how many more there are."""
    more = len(diffs) - shown
    return "; ".join(diffs[:shown]) + (f"; and {more} more" if more > 0 else "")


def resolve_config(config_arg: str | None, workdir: str | None, overrides: list[str],
                   mode: str) -> tuple[ml_collections.ConfigDict, str]:
    """(config, workdir) for a command. A workdir holding a run supplies its saved config: `--config` may be
    omitted, a `--config` or an override that would change the trained network is refused in one line (training
    modes resume with the saved config plus overrides; the trainer checks what may change)."""
    from training.checkpoint import config_to_json

    if workdir is None and config_arg is not None and config_arg.endswith(".json"):
        workdir = os.path.dirname(os.path.abspath(config_arg))  # RUN/config.json: the run is RUN
    if workdir is None:
        if config_arg is None:
            raise UserError("pass --config NAME (e.g. vp_toy) to start a run, or --workdir RUN to use a trained one")
        workdir = f"runs/{config_arg.replace('/', '_').removesuffix('.py')}"
    saved = saved_config(workdir)
    if saved is None:
        if config_arg is None:
            raise UserError(f"--workdir {workdir} holds no run (no {CONFIG_NAME}); pass --config NAME to start one")
        config = configs.get_config(config_arg)
        configs.apply_overrides(config, overrides)
        return config, workdir
    saved_json = config_to_json(saved)
    if config_arg is not None:
        given = configs.apply_overrides(configs.get_config(config_arg), overrides)
        diffs = _network_diffs(saved_json, given)
        if diffs:
            raise UserError(f"--config {config_arg} does not match the run in {workdir} ({_listed(diffs)}); "
                            f"omit --config to use the run's saved config ({os.path.join(workdir, CONFIG_NAME)})")
        if mode == "train":
            return given, workdir  # the trainer checks what may change on resume
    config = saved
    configs.apply_overrides(config, overrides)
    if mode != "train":
        diffs = _network_diffs(saved_json, config)
        if diffs:
            raise UserError(f"the overrides would change the trained network of {workdir} ({_listed(diffs)}); "
                            "only use-time settings (sampling.*, likelihood.*, eval.*, data.path, device, seed) "
                            "may change: drop them, or train a new run with --mode train --workdir NEW")
    return config, workdir
