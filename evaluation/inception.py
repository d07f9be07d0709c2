"""The standard FID Inception network (torch-fidelity's `FeatureExtractorInceptionV3`) and its weights.

The network is the TF-ported Inception of the original FID code (`pt_inception-2015-12-05`), implemented in
plain torch by torch-fidelity (torchmetrics builds on the same class). Its package `__init__` also imports
torchvision (for other feature extractors); where torchvision cannot import beside the installed torch, the
one torch-only submodule is imported without running that `__init__` (`inception_class`).

Weights: `eval.inception_weights` (a local file), else torch hub's cache (`TORCH_HOME`/hub/checkpoints),
else a download into that cache; without them and without network, one line says how to get them. Weights
files are read with `torch.load(weights_only=True)` (no code runs) and checked against the network exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import socket
import sys
import types
import urllib.error
from typing import Any, Iterator

import torch

from errors import UserError

_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch hub's convention: the file name carries its hash's first digits
FEATURES = ("2048", "logits_unbiased")  # pool features (FID, KID) and logits without bias (IS), as torch-fidelity


def _module():
    """torch-fidelity's Inception submodule, imported without the package `__init__` if that fails."""
    try:
        return importlib.import_module(_MODULE)
    except Exception as error:  # noqa: BLE001 -- torchvision raises RuntimeError/ImportError/OSError at import
        first_error = error
    spec = importlib.util.find_spec("torch_fidelity") if "torch_fidelity" not in sys.modules else None
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = list(spec.submodule_search_locations)[0]
    elif "torch_fidelity" in sys.modules:
        folder = list(getattr(sys.modules["torch_fidelity"], "__path__", []) or [None])[0]
    if folder is None:
        raise UserError("the FID Inception needs the package torch-fidelity: pip install torch-fidelity") from None
    # A namespace-style parent pointing at the installed folder: `torch_fidelity.x` submodules import from
    # there without running torch_fidelity/__init__.py (which imports torchvision for other extractors).
    parent = types.ModuleType("torch_fidelity")
    parent.__path__ = [folder]
    parent.__package__ = "torch_fidelity"
    sys.modules["torch_fidelity"] = parent
    try:
        return importlib.import_module(_MODULE)
    except Exception as error:  # noqa: BLE001
        del sys.modules["torch_fidelity"]
        raise UserError(f"cannot import torch-fidelity's Inception ({type(first_error).__name__}: "
                        f"{str(first_error).splitlines()[0][:120]}; then {type(error).__name__}: "
                        f"{str(error).splitlines()[0][:120]})") from None


def inception_class() -> type:
    """torch-fidelity's `FeatureExtractorInceptionV3` class."""
    return _module().FeatureExtractorInceptionV3


def hub_weights_path() -> str:
    """Where torch hub (and so torch-fidelity) caches the weights: TORCH_HOME/hub/checkpoints/FILE."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", WEIGHTS_FILE)


def missing_weights_message(where: str | None = None) -> str:
    """The one line that says how to get the weights."""
    where = where or hub_weights_path()
    return (f"FID/KID/IS need the Inception weights, not found at {where}: download {WEIGHTS_URL} to that "
            "path, or pass --config.eval.inception_weights=PATH")


def _online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_weights(path: str = "", download: bool = True) -> str:
    """The weights file to use: `path` if given, else torch hub's cached copy, else a fresh download to it.

    Raises UserError with one line (the URL and the config key) when there are none and none can be fetched.
    """
    if path:
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise UserError(f"eval.inception_weights={path!r} is not a file; " + missing_weights_message())
        return path
    target = hub_weights_path()
    if os.path.isfile(target):
        return target
    if not download or not _online():
        raise UserError(missing_weights_message(target))
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60.0)  # a stalled connection fails instead of hanging
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # torch hub writes to a temp file and renames it; the hash prefix is checked before the rename
        torch.hub.download_url_to_file(WEIGHTS_URL, target, hash_prefix=WEIGHTS_SHA256_PREFIX, progress=True)
    except (urllib.error.URLError, OSError, RuntimeError) as error:
        raise UserError(f"{missing_weights_message(target)} (download failed: {str(error).splitlines()[0]})") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return target


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """A state dict of tensors from `path` (torch.load with weights_only=True: no code runs)."""
    from training.load_errors import describe_load_error, load_weights_only

    try:
        state = load_weights_only(path)
    except Exception as error:  # noqa: BLE001 -- unpickling errors come in many types
        raise UserError(f"Inception weights {path!r} cannot be used: {describe_load_error(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"Inception weights {path!r} are not a state dict of tensors")
    return state


@contextlib.contextmanager
def _weights_source(module, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Make the library's constructor take `state` (or keep its random init when None) instead of reading a file.

    The constructor otherwise downloads or calls torch.load(weights_only=False), which could run code.
    """
    cls = module.FeatureExtractorInceptionV3
    saved_loader, saved_load = module.load_state_dict_from_url, cls.load_state_dict
    module.load_state_dict_from_url = lambda *args, **kwargs: state if state is not None else {}
    if state is None:
        cls.load_state_dict = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        module.load_state_dict_from_url = saved_loader
        cls.load_state_dict = saved_load


def build_inception(weights_path: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """torch-fidelity's Inception with the weights at `weights_path`, in eval mode on `device`.

    It takes uint8 (N, 3, H, W) images of any size (resized to 299 inside, as TF's FID code) and returns the
    tuple (pool features (N, 2048), logits without bias (N, 1008)).
    """
    module = _module()
    state = load_weights(weights_path)
    try:
        with _weights_source(module, state):
            net = module.FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES))
    except (RuntimeError, KeyError) as error:
        raise UserError(f"Inception weights {weights_path!r} do not fit the FID Inception "
                        f"({str(error).splitlines()[0][:200]})") from None
    return net.to(device).eval()


def random_inception_weights(path: str, seed: int = 0, calibration_images: int = 4) -> str:
    """Save the state dict of a randomly initialised Inception to `path` (atomically) and return `path`.

    For testing the metric pipeline without the real weights: the batch-norm statistics are set from one
    batch of random images so that the features have unit scale. Metrics computed with it compare nothing.
    """
    from atomic_io import save_torch

    module = _module()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _weights_source(module, None):
            net = module.FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES))
    for layer in net.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # cumulative average over the calibration batch
    images = torch.randint(0, 256, (calibration_images, 3, 32, 32), generator=generator, dtype=torch.uint8)
    net.train()
    with torch.no_grad():
        net(images)
    net.eval()
    save_torch(path, {k: v.detach().clone() for k, v in net.state_dict().items()})
    return path


def library_version() -> str:
    """torch-fidelity's version string (read from its version module without importing the package)."""
    try:
        from importlib.metadata import version

        return version("torch-fidelity")
    except Exception:  # noqa: BLE001
        return "unknown"


def describe(weights_path: str) -> dict[str, Any]:
    """What identifies the network: library, version, weights file and its SHA-256."""
    return {"library": "torch-fidelity", "version": library_version(), "network": "FeatureExtractorInceptionV3",
            "features": list(FEATURES), "weights": os.path.abspath(weights_path),
            "weights_sha256": file_sha256(weights_path)}
