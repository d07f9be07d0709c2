"""CIFAR-10 from the official python-pickle folder (`cifar-10-batches-py`) or from npz parts with keys x, y.

The pickles are read by `SafeUnpickler`, which only builds what those files contain (dicts, lists, bytes, str,
int and numpy arrays); any other global (a function or class that could run code) is refused in one line.
"""
from __future__ import annotations

import codecs
import glob
import os
import pickle

import numpy as np

from errors import UserError
from data.images import check_uint8_images
from validation import describe_read_error

PICKLE_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}
EXPECTED = ("expected a `cifar-10-batches-py` folder (data_batch_1..5, test_batch), a folder of npz parts "
            "(train*.npz / test*.npz with keys x (N,32,32,3) uint8 and y), or npz file(s): a path, a glob "
            "or a comma-separated list")


def _numpy_global(module: str, name: str):
    return getattr(__import__(module, fromlist=[name]), name)


# The only globals a CIFAR-10 batch pickle refers to: numpy array reconstruction (Python 2 and 3 writers, numpy 1
# and 2 module names, pickle protocols 2-5) and bytes from Python 3 protocol-2 writers. Dicts, lists, bytes,
# str and int are built by pickle opcodes without any global.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): lambda: _numpy_global("numpy._core.multiarray", "_reconstruct")
    if hasattr(np, "_core") else _numpy_global("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _numpy_global("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): lambda: _numpy_global("numpy._core.numeric", "_frombuffer")
    if hasattr(np, "_core") else _numpy_global("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): lambda: _numpy_global("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"): lambda: codecs.encode,
}


class UnsafePickle(pickle.UnpicklingError):
    """A pickle refers to something other than the plain data of a CIFAR-10 batch."""


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain data and numpy arrays; any other global is refused (no code runs)."""

    def find_class(self, module: str, name: str):
        getter = _ALLOWED_GLOBALS.get((module, name))
        if getter is None:
            raise UnsafePickle(f"it refers to {module}.{name}, which a CIFAR-10 batch never contains")
        return getter()


def safe_pickle_load(handle) -> object:
    """Unpickle a CIFAR-10 batch (Python 2 strings as bytes) with `SafeUnpickler`."""
    return SafeUnpickler(handle, encoding="bytes").load()


def _class_labels(raw, path: str, key: str) -> np.ndarray:
    """CIFAR-10's labels as int64, refused in one line unless they are integers 0..9."""
    labels = np.asarray(raw)
    if labels.dtype.kind not in "iu":
        raise UserError(f"CIFAR-10 file {path!r}: labels {key} must be integers 0..9, got dtype {labels.dtype}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise UserError(f"CIFAR-10 file {path!r}: labels {key} must lie in 0..9, found {int(labels.min())}.."
                        f"{int(labels.max())}")
    return labels.astype(np.int64)


def _read_pickle_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = safe_pickle_load(handle)
    except UnsafePickle as error:
        raise UserError(f"CIFAR-10 batch {path!r} was refused: {error} (data files never run code)") from None
    except Exception as error:  # a damaged pickle raises many types (IndexError, struct.error, ...)
        raise UserError(f"CIFAR-10 batch {path!r} is not a CIFAR-10 python pickle "
                        f"(expected a dict with b'data' (N, 3072) uint8 and b'labels'): "
                        f"{type(error).__name__}: {str(error)[:120]}") from None
    try:
        data = np.asarray(batch[b"data"])
        labels = np.asarray(batch[b"labels"])
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise UserError(f"CIFAR-10 batch {path!r} is not a CIFAR-10 python pickle "
                        f"(expected a dict with b'data' (N, 3072) uint8 and b'labels'): {error}") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise UserError(f"CIFAR-10 batch {path!r}: expected b'data' of shape (N, 3072) uint8 and N labels, "
                        f"got {data.shape} {data.dtype} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), _class_labels(labels, path, "b'labels'")  # rows are R, G, B planes of 32x32


def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise UserError(f"npz file {path!r} has keys {sorted(archive.keys())}; expected x (N,32,32,3) "
                                "uint8 and y (N,)")
            x, y = archive["x"], archive["y"]
    except UserError:
        raise
    except Exception as error:  # numpy and zipfile raise many types for damaged files
        raise UserError(f"cannot read npz file {path!r}: {describe_read_error(error)}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
        raise UserError(f"npz file {path!r}: expected x of shape (N, 32, 32, 3) uint8, got {x.shape} {x.dtype}")
    if y.shape != (x.shape[0],):
        raise UserError(f"npz file {path!r}: expected y of shape ({x.shape[0]},), got {y.shape}")
    return x.transpose(0, 3, 1, 2), _class_labels(y, path, "y")


def _pickle_folder(path: str) -> str | None:
    for folder in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(folder, "data_batch_1")) or os.path.isfile(os.path.join(folder, "test_batch")):
            return folder
    return None


def resolve_cifar10_files(path: str, split: str = "train") -> tuple[str, list[str]]:
    """("pickle" | "npz", files) for data.path and a split; UserError saying what was expected otherwise."""
    if split not in PICKLE_FILES:
        raise UserError(f"unknown split {split!r}; valid: train, test")
    if not path:
        raise UserError(f"CIFAR-10 needs a data location: --config.data.path=... ({EXPECTED})")
    if os.path.isdir(path):
        folder = _pickle_folder(path)
        if folder is not None:
            files = [os.path.join(folder, name) for name in PICKLE_FILES[split]]
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise UserError(f"CIFAR-10 folder {folder!r} lacks {', '.join(os.path.basename(m) for m in missing)}")
            return "pickle", files
        files = sorted(glob.glob(os.path.join(path, f"{split}*.npz")))
        if not files:
            raise UserError(f"no CIFAR-10 {split} data in folder {path!r}; {EXPECTED}")
        return "npz", files
    files = []
    for item in (p.strip() for p in path.split(",") if p.strip()):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise UserError(f"CIFAR-10 data path {item!r} does not exist; {EXPECTED}")
        files.extend(matches)
    if not files:
        raise UserError(f"CIFAR-10 data path {path!r} names no files; {EXPECTED}")
    if not all(f.endswith(".npz") for f in files):
        raise UserError(f"CIFAR-10 data files must be .npz, got {', '.join(files)}; {EXPECTED}")
    return "npz", files


def load_cifar10(path: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 RGB and labels (N,) int64; several npz parts are concatenated in order.

    A folder gives the split's files (pickle batches or `{split}*.npz`); explicit npz files are used as given.
    """
    kind, files = resolve_cifar10_files(path, split)
    reader = _read_pickle_batch if kind == "pickle" else _read_npz
    parts = [reader(f) for f in files]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = np.concatenate([p[1] for p in parts])
    return check_uint8_images(images, f"CIFAR-10 at {path!r}", channels=3, size=32), labels
