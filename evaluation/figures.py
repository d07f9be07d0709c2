"""Figures: 2-D sample scatter plots (optionally next to reference samples) and image grids (matplotlib Agg)."""
from __future__ import annotations

import math
import os

import numpy as np
import torch

from atomic_io import save_figure
from errors import UserError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32 if x.is_floating_point() else x.dtype).numpy()
    return np.asarray(x)


def _prepare_path(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)


def save_scatter(path: str, samples, reference=None, title: str = "", max_points: int = 5000) -> str:
    """Scatter plot of 2-D `samples`; with `reference`, two panels side by side (data | samples) on shared axes."""
    plt = _pyplot()
    samples = _as_numpy(samples)
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise UserError(f"save_scatter needs (N, 2) samples, got shape {samples.shape}")
    panels = [("samples", samples[:max_points])]
    if reference is not None:
        reference = _as_numpy(reference)
        if reference.ndim != 2 or reference.shape[1] != 2:
            raise UserError(f"save_scatter needs (N, 2) reference samples, got shape {reference.shape}")
        panels.insert(0, ("data", reference[:max_points]))
    finite = np.concatenate([p[1][np.isfinite(p[1]).all(1)] for p in panels]) if panels else samples
    if finite.size:
        lo, hi = np.percentile(finite, 0.5, axis=0), np.percentile(finite, 99.5, axis=0)
        pad = 0.1 * (hi - lo).max() + 1e-3
        center, half = (lo + hi) / 2, (hi - lo).max() / 2 + pad
    else:
        center, half = np.zeros(2), 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (name, points) in zip(axes[0], panels):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5, linewidths=0,
                   color="tab:gray" if name == "data" else "tab:blue")
        ax.set_xlim(center[0] - half, center[0] + half)
        ax.set_ylim(center[1] - half, center[1] + half)
        ax.set_aspect("equal")
        ax.set_title(f"{name} (n={len(points)})", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _prepare_path(path)
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def make_grid(images, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images (uint8 0..255 or float in [0, 1]) into one (H', W', 3) uint8 array."""
    images = _as_numpy(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f"image grid needs (N, C, H, W) images with C = 1 or 3, got shape {images.shape}")
    if images.dtype != np.uint8:
        images = np.clip(np.nan_to_num(images.astype(np.float32)) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    n, _, h, w = images.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + padding) + padding, nrow * (w + padding) + padding, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top:top + h, left:left + w] = images[k].transpose(1, 2, 0)
    return grid


def upscale_nearest(grid: np.ndarray, min_width: int) -> np.ndarray:
    """Repeat every pixel k x k (nearest neighbour, k the smallest integer giving >= min_width columns)."""
    factor = max(1, int(math.ceil(min_width / grid.shape[1])))
    return grid if factor == 1 else np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)


def save_image_grid(path: str, images, nrow: int | None = None, title: str = "", min_width: int = 256,
                    col_labels: list[str] | None = None) -> str:
    """Save (N, C, H, W) images (uint8, or float in [0, 1]) as a PNG grid with `nrow` images per row.

    Small images are upscaled (nearest neighbour, whole pixels) until the grid is at least `min_width` pixels
    wide; `title` goes above the grid, `col_labels` (one per column) above the columns.
    """
    plt = _pyplot()
    grid = make_grid(images, nrow)
    columns = nrow or int(math.ceil(math.sqrt(_as_numpy(images).shape[0])))
    # wide enough for the title (at most 7.5 px per character at 9 pt) and every column label (6 px at 8 pt)
    widest_label = max((len(label) for label in col_labels or []), default=0)
    needed = max(min_width, int(7.5 * len(title)) + 10, (6 * widest_label + 12) * columns if col_labels else 0)
    grid = upscale_nearest(grid, needed)
    height, width = grid.shape[:2]
    dpi = 100
    lines = (1 if title else 0) + (1 if col_labels else 0)
    band = 18 * lines + (6 if lines else 0)  # pixels of text above the grid
    fig = plt.figure(figsize=(width / dpi, (height + band) / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + band)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.text(0.5, 1.0 - 4 / (height + band), title, ha="center", va="top", fontsize=9)
    if col_labels:
        for k, label in enumerate(col_labels[:columns]):
            fig.text((k + 0.5) / columns, height / (height + band) + 2 / (height + band), label, ha="center",
                     va="bottom", fontsize=8)
    _prepare_path(path)
    save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return path
