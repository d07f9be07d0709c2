"""Score networks (MLP, DDPM++/NCSN++, DDPM, NCSNv2), the network -> score conversion, and weight EMA."""
from __future__ import annotations

import importlib

from torch import nn

from errors import UserError
from models.ema import ExponentialMovingAverage
from models.score_fn import get_score_fn, noise_labels

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


def create_model(config) -> nn.Module:
    """Build the network named by config.model.name (on CPU, float32)."""
    name = str(config.model.name).lower()
    if name not in MODELS:
        raise UserError(f"unknown model {config.model.name!r}; valid: {', '.join(MODELS)}")
    if config.model.get("scale_by_sigma", False) and str(config.sde.name).lower() != "vesde":
        raise UserError("model.scale_by_sigma divides the output by sigma and only makes sense with the VE SDE "
                        f"(sde.name='vesde'), got sde.name={config.sde.name!r}")
    if int(config.data.get("num_classes", 0)) > 0 and name not in CLASS_CONDITIONAL:
        raise UserError(f"model {name!r} cannot be class-conditional (data.num_classes > 0); "
                        f"use one of: {', '.join(CLASS_CONDITIONAL)}")
    module_name, class_name = MODELS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config)


__all__ = ["MODELS", "available_models", "create_model", "get_score_fn", "noise_labels", "ExponentialMovingAverage"]
