"""Inception statistics of a data split, computed once and cached next to the data with what they came from.

The cache is a pair `{dataset}_{split}_{count}_{weights}.npz` (mu, sigma of the pool features; a seeded subset
of the pool features for KID) + `.json` (the record: dataset, absolute path, split, image count, the data
files' sizes and mtimes, the Inception weights' SHA-256, the library version). A record that differs from
the current one (data changed, other weights, other settings) makes the statistics stale: they are
recomputed and the pair is replaced (atomically).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from atomic_io import save_npz, write_json
from errors import UserError
from evaluation.image_metrics import feature_statistics, inception_features, inception_score

FORMAT = 1
SPLITS = ("train", "test")


def _file_entry(path: str) -> dict[str, Any]:
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def data_fingerprint(config, split: str) -> dict[str, Any]:
    """What identifies the images of a split: dataset, location and its files' sizes and modification times."""
    name = str(config.data.dataset).lower()
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    record: dict[str, Any] = {"dataset": name, "split": split, "image_size": int(config.data.image_size),
                              "num_channels": int(config.data.num_channels)}
    if name == "cifar10":
        from data.cifar10 import resolve_cifar10_files

        _, files = resolve_cifar10_files(str(config.data.path), split)
        record.update(path=os.path.abspath(str(config.data.path)), files=[_file_entry(f) for f in files])
    elif name in ("digits", "image_folder"):
        if split != "train":
            raise UserError(f"data set {name!r} has one split (all its images): use --split train")
        if name == "digits":
            import importlib.resources

            import sklearn

            source = str(importlib.resources.files("sklearn.datasets") / "data" / "digits.csv.gz")
            record.update(path=source, files=[_file_entry(source)], sklearn=sklearn.__version__)
        else:
            from data.images import list_image_files

            root = os.path.abspath(str(config.data.path))
            if not os.path.isdir(root):
                raise UserError(f"image folder {root!r} does not exist (--config.data.path=DIR)")
            digest, count = hashlib.sha256(), 0
            for path in list_image_files(root):  # exactly the files the loader reads
                entry = _file_entry(path)
                digest.update(f"{os.path.relpath(entry['path'], root)}\0{entry['size']}\0"
                              f"{entry['mtime_ns']}\n".encode())
                count += 1
            record.update(path=root, num_files=count, files_sha256=digest.hexdigest())
    else:
        raise UserError(f"no reference statistics for data set {config.data.dataset!r} (image sets: digits, "
                        "cifar10, image_folder)")
    return record


def _user_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "scoresde_toolkit", "fid_stats")


def _writable(folder: str) -> bool:
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK)


def stats_dir(config, fingerprint: dict[str, Any]) -> str:
    """eval.stats_dir if set; else `fid_stats/` beside the data files (the user cache for digits, or when the
    data's folder is read-only)."""
    if str(config.eval.get("stats_dir", "")):
        return os.path.abspath(os.path.expanduser(str(config.eval.stats_dir)))
    if fingerprint["dataset"] == "digits":
        return _user_cache()
    if fingerprint["dataset"] == "image_folder":
        folder = fingerprint["path"]
    else:
        folder = os.path.dirname(fingerprint["files"][0]["path"])
    folder = os.path.join(folder, "fid_stats")
    return folder if _writable(folder) else _user_cache()


def _load_cache(npz_path: str, json_path: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """The cached statistics if both files exist, the record matches exactly and the arrays are sound."""
    if not (os.path.isfile(npz_path) and os.path.isfile(json_path)):
        return None
    try:
        with open(json_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("record") != record:
            return None
        with np.load(npz_path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in ("mu", "sigma", "features")}
    except Exception:  # noqa: BLE001 -- numpy, zipfile, zlib, json raise many types: a damaged cache is stale
        return None  # recomputed and replaced
    d = arrays["mu"].shape[0] if arrays["mu"].ndim == 1 else -1
    if (d <= 0 or arrays["sigma"].shape != (d, d) or arrays["features"].ndim != 2
            or arrays["features"].shape[1] != d or not all(np.isfinite(a).all() for a in arrays.values())):
        return None
    return {**arrays, **{k: v for k, v in saved.items() if k != "record"}, "record": record, "cached": True}


def load_split_images(config, split: str, count: int) -> np.ndarray:
    """The first `count` images (all if 0) of a split, uint8 (N, C, H, W)."""
    from data.loaders import load_image_dataset

    images, _ = load_image_dataset(config, split)
    if count > 0:
        if count > images.shape[0]:
            raise UserError(f"eval.reference_num_images={count} but the {split} split has {images.shape[0]} images")
        images = images[:count]
    return images


def check_reference_request(config, split: str) -> None:
    """Fail now, in one line, on what would stop the reference statistics later (data path, split, image count)."""
    data_fingerprint(config, split)
    requested = int(config.eval.reference_num_images)
    if requested > 0:
        load_split_images(config, split, requested)


def reference_statistics(config, split: str, network: torch.nn.Module, network_info: dict[str, Any],
                         progress: bool = True) -> dict[str, Any]:
    """mu, sigma and a KID subset of pool features of a split's images (cached; see the module docstring).

    Returns a dict with `mu`, `sigma`, `features`, `num_images`, `inception_score` (of the data), `record`,
    `path` (the npz) and `cached` (whether it came from the cache).
    """
    fingerprint = data_fingerprint(config, split)
    requested = int(config.eval.reference_num_images)
    keep = int(config.eval.kid_reference_features)
    record = {"format": FORMAT, **fingerprint, "reference_num_images": requested, "subset": "first images of the split",
              "kid_reference_features": keep, "kid_subset_seed": 0, "inception_score_rows": "shuffled, seed 0",
              "inception": {k: network_info[k] for k in ("library", "version", "network", "features", "weights_sha256")}}
    folder = stats_dir(config, fingerprint)
    stem = os.path.join(folder, f"{fingerprint['dataset']}_{split}_{requested or 'all'}_"
                                f"{network_info['weights_sha256'][:12]}")
    cached = _load_cache(stem + ".npz", stem + ".json", record)
    if cached is not None:
        cached["path"] = stem + ".npz"
        return cached
    images = load_split_images(config, split, requested)
    if progress:
        print(f"[eval] reference statistics of {images.shape[0]} {fingerprint['dataset']} {split} images "
              f"-> {stem}.npz")
    pool, logits = inception_features(images, network, int(config.eval.batch_size))
    mu, sigma = feature_statistics(pool)
    rows = np.sort(np.random.default_rng(0).choice(pool.shape[0], min(keep, pool.shape[0]), replace=False))
    features = pool[rows].astype(np.float32)
    # the data's IS over a seeded shuffle of its rows: files sorted by class (an image folder per class) would
    # otherwise put one class in each part (torch-fidelity shuffles too)
    shuffled = logits[np.random.default_rng(0).permutation(logits.shape[0])]
    is_mean, is_std = inception_score(shuffled, splits=min(int(config.eval.isc_splits), pool.shape[0]))
    save_npz(stem + ".npz", compressed=False, mu=mu, sigma=sigma, features=features)
    summary = {"num_images": int(pool.shape[0]), "inception_score": [is_mean, is_std]}
    write_json(stem + ".json", {"record": record, **summary})
    return {"mu": mu, "sigma": sigma, "features": features.astype(np.float64), **summary, "record": record,
            "path": stem + ".npz", "cached": False}
