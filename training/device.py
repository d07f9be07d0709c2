"""Pick the compute device from the config."""
from __future__ import annotations

import contextlib

import torch

from errors import UserError


def get_device(config) -> torch.device:
    """`config.device`: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:K"."""
    name = config.get("device", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name!r} (--device / config key device) but CUDA is not available on this "
                        "machine; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (--device / config key device); valid: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r} (--device / config key device); valid: auto, cpu, cuda, cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def strict_float32():
    """Disable TF32 in CUDA matmuls and cuDNN convolutions inside the block (exact float32 arithmetic).

    PyTorch lets cuDNN convolutions use TF32 (10-bit mantissa) by default on Ampere and later; the
    likelihood must be computed in true float32 (issue 6). Restores the previous settings on exit.
    """
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
