"""The scikit-learn 8x8 handwritten digits (1,797 images) as a small 8-bit image set."""
from __future__ import annotations

import numpy as np


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 1, 8, 8) uint8 in 0..255 and labels (N,) int64, shipped with scikit-learn (no download)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, bunch.target.astype(np.int64)
