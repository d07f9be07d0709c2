"""Score networks (MLP, DDPM++/NCSN++, DDPM, NCSNv2), the network -> score conversion, and weight EMA."""
from __future__ import annotations

import importlib

from torch import nn

from errors import UserError
from models.ema import ExponentialMovingAverage
from models.parameterization import PARAMETERIZATIONS, check_parameterization
from models.score_fn import get_score_fn, noise_labels, score_fn_options

# name -> "module:Class"; imported lazily so a toy run does not build the U-Net code.
MODELS = {
    "mlp": "models.mlp:MLPScoreNet",
    "ddpmpp": "models.ncsnpp:DDPMpp",
    "ncsnpp": "models.ncsnpp:NCSNpp",
    "ddpm": "models.ddpm:DDPM",
    "ncsnv2": "models.ncsnv2:NCSNv2",
}

# networks that take class labels (data.num_classes > 0): model(x, labels, class_labels=y)
CLASS_CONDITIONAL = ("mlp", "ddpmpp", "ncsnpp", "ddpm")


def available_models() -> list[str]:
    """Names accepted by config.model.name."""
    return list(MODELS)


def _check_parameterization(config, name: str) -> None:
    """model.parameterization fits the network, its output scaling and the time convention (one-line errors)."""
    options = score_fn_options(config)
    parameterization = check_parameterization(options["parameterization"], options["sigma_data"])
    if parameterization == "score":
        return
    if name == "ncsnv2":
        raise UserError(f"model.parameterization={parameterization!r} is not available for ncsnv2 (a discrete "
                        "NCSN score network); use 'score' or another network")
    if config.model.get("scale_by_sigma", False):
        raise UserError(f"model.scale_by_sigma divides a score by sigma; with model.parameterization="
                        f"{parameterization!r} set model.scale_by_sigma=false")
    if not config.training.get("continuous", True):
        raise UserError(f"model.parameterization={parameterization!r} needs training.continuous=true "
                        "(the discrete DDPM/SMLD conventions are those of 'score')")


def create_model(config) -> nn.Module:
    """Build the network named by config.model.name (on CPU, float32)."""
    name = str(config.model.name).lower()
    if name not in MODELS:
        raise UserError(f"unknown model {config.model.name!r}; valid: {', '.join(MODELS)}")
    if config.model.get("scale_by_sigma", False) and str(config.sde.name).lower() != "vesde":
        raise UserError("model.scale_by_sigma divides the output by sigma and only makes sense with the VE SDE "
                        f"(sde.name='vesde'), got sde.name={config.sde.name!r}")
    _check_parameterization(config, name)
    if int(config.data.get("num_classes", 0)) > 0 and name not in CLASS_CONDITIONAL:
        raise UserError(f"model {name!r} cannot be class-conditional (data.num_classes > 0); "
                        f"use one of: {', '.join(CLASS_CONDITIONAL)}")
    module_name, class_name = MODELS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)


__all__ = ["MODELS", "PARAMETERIZATIONS", "available_models", "create_model", "get_score_fn", "noise_labels",
           "score_fn_options", "ExponentialMovingAverage"]
