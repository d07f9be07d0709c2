"""Scaling between data space and the model's range ([0, 1] or [-1, 1] for images)."""
from __future__ import annotations

import math


def data_scale(config) -> tuple[float, float]:
    """(a, b) such that model input = a * x + b for x in [0, 1]: (2, -1) if config.data.centered else (1, 0)."""
    return (2.0, -1.0) if config.data.get("centered", False) else (1.0, 0.0)


def get_data_scaler(config):
    """Map images in [0, 1] to the model's range (identity for vector data)."""
    if config.data.get("kind", "image") != "image":
        return lambda x: x
    a, b = data_scale(config)
    return lambda x: a * x + b


def get_data_inverse_scaler(config):
    """Map model outputs back to [0, 1] images (identity for vector data)."""
    if config.data.get("kind", "image") != "image":
        return lambda x: x
    a, b = data_scale(config)
    return lambda x: (x - b) / a


def scaling_log_det_per_dim(config) -> float:
    """log |d(model input)/d(x)| per dimension for x in [0, 1] (log 2 for centered data)."""
    return math.log(data_scale(config)[0])
