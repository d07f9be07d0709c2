"""Pick the compute device from the config."""
from __future__ import annotations

import torch

from errors import UserError


def get_device(config) -> torch.device:
    """`config.device`: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:K"."""
    name = config.get("device", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config.device={name!r} but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:K") from None
