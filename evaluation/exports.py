"""Outputs other tools read: image samples as PNG folders and NHWC `arr_0` npz files; EMA weights as safetensors.

`python main.py --mode export --config NAME --workdir DIR` writes `DIR/export/ema.safetensors` (the EMA weights
of the latest checkpoint, plain tensors; the config JSON and the step in its metadata) and `DIR/export/config.json`.
`load_exported(path, config)` builds the config's network with those weights.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

from atomic_io import remove_stale_temps, save_npz, write_bytes, write_text
from errors import UserError

EXPORT_FORMAT = "scoresde-toolkit/ema/1"


def to_nhwc_rgb(samples: np.ndarray) -> np.ndarray:
    """uint8 (N, C, H, W) images as (N, H, W, 3) uint8, grayscale repeated to RGB (what FID tools expect)."""
    x = np.asarray(samples)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"image export needs uint8 (N, 1 or 3, H, W) images, got {x.shape} {x.dtype}")
    x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x)


def save_nhwc_npz(path: str, samples: np.ndarray) -> str:
    """Write the images as key `arr_0`, uint8 NHWC RGB: the layout of external FID tools' sample batches."""
    save_npz(path, compressed=False, arr_0=to_nhwc_rgb(samples))
    return path


def save_png_folder(folder: str, samples: np.ndarray) -> str:
    """One PNG per image (`000000.png`, ...; grayscale stays 8-bit L, RGB 24-bit) in `folder`."""
    from PIL import Image

    x = np.asarray(samples)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"PNG export needs uint8 (N, 1 or 3, H, W) images, got {x.shape} {x.dtype}")
    os.makedirs(folder, exist_ok=True)
    remove_stale_temps(folder)  # a killed earlier export's temp files (the run's own cleanup stops one level up)
    width = max(6, len(str(len(x) - 1)))
    for k, image in enumerate(x):
        buffer = io.BytesIO()
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        write_bytes(os.path.join(folder, f"{k:0{width}d}.png"), buffer.getvalue())
    return folder


def export_paths(workdir: str) -> tuple[str, str]:
    """(weights, config) paths of a run's export: WORKDIR/export/ema.safetensors and config.json."""
    folder = os.path.join(workdir, "export")
    return os.path.join(folder, "ema.safetensors"), os.path.join(folder, "config.json")


def export_ema(config, workdir: str) -> tuple[str, str, int]:
    """Write the EMA weights of the run's latest checkpoint as safetensors plus the config; (paths..., step)."""
    from safetensors.torch import save

    from training.checkpoint import config_to_json, restore_model

    model, step = restore_model(config, workdir, "cpu", use_ema=True)
    # independent contiguous copies: safetensors refuses tensors that share storage
    tensors = {name: value.detach().contiguous().clone() for name, value in model.state_dict().items()}
    config_json = config_to_json(config)
    weights_path, config_path = export_paths(workdir)
    write_bytes(weights_path, save(tensors, metadata={"format": EXPORT_FORMAT, "step": str(step),
                                                      "config": config_json}))
    write_text(config_path, config_json if config_json.endswith("\n") else config_json + "\n")
    return weights_path, config_path, step


def load_exported(path: str, config, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The network of `config` with the weights of an exported safetensors file, in eval mode on `device`.

    The file is read as plain tensors (no code runs). A file exported from another network (its recorded
    config differs in the model, SDE or data shape) or one whose tensors do not fit is refused in one line.
    """
    import models
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from training.checkpoint import network_differences

    if not os.path.isfile(path):
        raise UserError(f"exported weights {path!r} do not exist (python main.py --mode export ...)")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path!r} is not a safetensors file ({str(error).splitlines()[0][:160]})") from None
    if "config" in metadata:
        try:
            diffs = network_differences(metadata["config"], config)
        except (json.JSONDecodeError, TypeError, AttributeError):
            raise UserError(f"{path!r}: its metadata 'config' is not a config JSON") from None
        if diffs:
            raise UserError(f"{path!r} was exported from a different network: {'; '.join(diffs[:6])}")
    model = models.create_model(config)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise UserError(f"{path!r} does not fit the network of this config "
                        f"({str(error).splitlines()[0][:200]})") from None
    return model.to(device).eval()


def run(config, workdir: str, args) -> int:
    """`--mode export`: EMA weights of the latest checkpoint -> WORKDIR/export/ema.safetensors + config.json."""
    weights_path, config_path, step = export_ema(config, workdir)
    size = os.path.getsize(weights_path) / 2 ** 20
    print(f"EMA weights of step {step} -> {weights_path} ({size:.1f} MiB, safetensors); config -> {config_path}")
    print("load them back with: from evaluation.exports import load_exported; "
          f"model = load_exported({weights_path!r}, config)")
    return 0
