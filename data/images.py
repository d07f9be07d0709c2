"""Image-set helpers: uint8 checks, uniform dequantization, random flips, and an image-folder loader."""
from __future__ import annotations

import os

import numpy as np
import torch

from errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def check_uint8_images(images: np.ndarray, where: str, channels: int | None = None,
                       size: int | None = None) -> np.ndarray:
    """Validate an (N, C, H, W) uint8 array; raise UserError naming `where` and what was expected."""
    expected = f"(N, {channels or 'C'}, {size or 'H'}, {size or 'W'}) uint8"
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        raise UserError(f"{where}: expected images {expected}, got shape {shape} dtype {dtype}")
    if channels is not None and images.shape[1] != channels:
        raise UserError(f"{where}: expected {channels} channels, got {images.shape[1]} (shape {images.shape})")
    if size is not None and images.shape[2:] != (size, size):
        raise UserError(f"{where}: expected {size}x{size} images, got {images.shape[2]}x{images.shape[3]}")
    if images.shape[0] == 0:
        raise UserError(f"{where}: no images")
    return images


def to_unit_interval(images: torch.Tensor, dequantize: bool, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels k in 0..255 -> [0, 1]: k / 255, or (k + u) / 256 with u ~ U[0, 1) (uniform dequantization)."""
    x = images.to(dtype)
    if dequantize:
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=dtype)
        return (x + u) / 256.0
    return x / 255.0


def from_unit_interval(x: torch.Tensor, dequantized: bool) -> torch.Tensor:
    """[0, 1] values -> uint8 pixels, the inverse of `to_unit_interval`: k = floor(256 x) for dequantized data
    ((k + u) / 256 lies in bin k), k = round(255 x) otherwise (k / 255); clamped to 0..255."""
    x = torch.nan_to_num(x.float(), nan=0.0)
    k = torch.floor(x * 256.0) if dequantized else torch.round(x * 255.0)
    return k.clamp(0, 255).to(torch.uint8)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image of an (N, C, H, W) batch left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _center_square(image):
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def list_image_files(root: str) -> list[str]:
    """The image files under `root`, recursively and sorted: the one listing the loader and the FID statistics'
    fingerprint both use. Symbolic links to folders are followed once (a folder reached twice, e.g. through a
    link to a parent, is skipped); hidden files and folders (names starting with '.') are left out."""
    files, seen = [], set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        files.extend(os.path.join(folder, name) for name in names
                     if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(folder, name)))
    return sorted(files)


def load_image_folder(path: str, image_size: int, num_channels: int = 3, limit: int | None = None) -> np.ndarray:
    """Every image file under `path` (recursively, sorted), center-cropped to a square and resized:
    (N, C, image_size, image_size) uint8 with C = 3 (RGB) or 1 (grayscale)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isdir(path):
        raise UserError(f"image folder {path!r} does not exist; expected a folder of image files "
                        f"({', '.join(IMAGE_EXTENSIONS)}), set with --config.data.path=DIR")
    if num_channels not in (1, 3):
        raise UserError(f"image folders load as 1 (grayscale) or 3 (RGB) channels, got data.num_channels={num_channels}")
    files = list_image_files(path)
    if limit is not None:
        files = files[:limit]
    if not files:
        raise UserError(f"image folder {path!r} holds no image files (expected {', '.join(IMAGE_EXTENSIONS)})")
    out = np.empty((len(files), num_channels, image_size, image_size), dtype=np.uint8)
    mode = "RGB" if num_channels == 3 else "L"
    for k, name in enumerate(files):
        try:
            with Image.open(name) as image:
                image = _center_square(image.convert(mode))
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BICUBIC)
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # PIL's ways to fail on damage
            raise UserError(f"cannot read image {name!r}: {error}") from None
        except Image.DecompressionBombError as error:  # larger than PIL's pixel limit (possibly a hostile file)
            raise UserError(f"image {name!r} is too large to read safely: {error}") from None
        out[k] = array[None] if num_channels == 1 else array.transpose(2, 0, 1)
    return out
