"""Training batches as a deterministic function of (seed, step, rank), so a resumed run sees the same data.

Toy streams draw fresh samples from a per-step generator; image streams walk through one random permutation
per epoch (seeded by (seed, epoch)), each process taking its slice of the global batch, then apply uniform
dequantization, random flips and the scaling to the model's range.
"""
from __future__ import annotations

import numpy as np
import torch

from data.digits import load_digits_uint8
from data.images import check_uint8_images, load_image_folder, random_hflip, to_unit_interval
from data.mixtures import TOY_MIXTURES
from data.toys import SAMPLE_TOYS, sample_toy
from data.transforms import get_data_scaler
from errors import UserError

IMAGE_SETS = ("digits", "cifar10", "image_folder")
_SALT_DATA, _SALT_ORDER = 0x5D, 0x0E


def stream_seed(seed: int, step: int, rank: int = 0, salt: int = 0) -> int:
    """A 63-bit seed mixed from (seed, step, rank, salt) (numpy SeedSequence hashing)."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step), int(rank), int(salt)]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & ((1 << 63) - 1)


def step_generator(seed: int, step: int, rank: int = 0, salt: int = 0, device="cpu") -> torch.Generator:
    """A torch.Generator seeded with stream_seed(...) on `device`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, step, rank, salt))
    return generator


def toy_names() -> list[str]:
    """Names of the 2-D / vector toy data sets."""
    return list(TOY_MIXTURES) + list(SAMPLE_TOYS)


class ToyStream:
    """Fresh exact samples of a toy distribution at every step."""

    def __init__(self, name: str, batch_size: int, seed: int, rank: int = 0, device="cpu"):
        if name not in toy_names():
            raise UserError(f"unknown toy data set {name!r}; valid: {', '.join(toy_names())}")
        self.name, self.batch_size, self.seed, self.rank = name, int(batch_size), int(seed), int(rank)
        self.device = torch.device(device)

    def batch(self, step: int) -> torch.Tensor:
        """The (batch_size, dim) float32 batch of this process at `step`."""
        generator = step_generator(self.seed, step, self.rank, _SALT_DATA)
        return sample_toy(self.name, self.batch_size, generator=generator).to(self.device, non_blocking=True)

    def labelled_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same batch as `batch(step)` and its classes: the mixture component of each sample (mixtures only)."""
        if self.name not in TOY_MIXTURES:
            raise UserError(f"toy data set {self.name!r} has no classes; class-conditional toys are the mixtures: "
                            f"{', '.join(TOY_MIXTURES)}")
        generator = step_generator(self.seed, step, self.rank, _SALT_DATA)
        x, labels = TOY_MIXTURES[self.name]().sample(self.batch_size, generator=generator, return_labels=True)
        return x.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class ImageStream:
    """Epoch-wise shuffled batches of a uint8 image set, dequantized, flipped and scaled on the device."""

    def __init__(self, images: np.ndarray | torch.Tensor, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, device="cpu", dequantize: bool = False, flip: bool = False,
                 scaler=None, keep_on_device: bool = True, channels_last: bool = False,
                 labels: np.ndarray | torch.Tensor | None = None):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UserError(f"image stream needs (N, C, H, W) uint8 images, got {tuple(images.shape)} {images.dtype}")
        self.device = torch.device(device)
        self.images = images.to(self.device) if keep_on_device else images
        self.n = images.shape[0]
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.dequantize, self.flip = bool(dequantize), bool(flip)
        self.scaler = scaler or (lambda x: x)
        self.channels_last = channels_last
        self._perms: dict[int, torch.Tensor] = {}
        self.labels = None if labels is None else torch.as_tensor(labels).long()
        if self.labels is not None and self.labels.shape != (self.n,):
            raise UserError(f"image stream: {self.n} images but labels of shape {tuple(self.labels.shape)}")

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            generator = step_generator(self.seed, epoch, 0, _SALT_ORDER)
            # Drawn on the CPU (the same order on every device), moved once per epoch to where the images are.
            self._perms[epoch] = torch.randperm(self.n, generator=generator).to(self.images.device)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        """Row indices of this process's batch at `step` (global batch = batch_size x world_size rows).

        Positions start .. start + batch_size - 1 of the endless sequence of epoch permutations: slices of
        the device-resident permutations, so no index tensor crosses from the host per step (no sync).
        """
        global_batch = self.batch_size * self.world_size
        position = step * global_batch + self.rank * self.batch_size
        end = position + self.batch_size
        pieces = []
        while position < end:
            epoch, within = divmod(position, self.n)
            take = min(end - position, self.n - within)
            pieces.append(self._permutation(epoch)[within:within + take])
            position += take
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def batch(self, step: int) -> torch.Tensor:
        """The (batch_size, C, H, W) float batch of this process at `step`, in the model's range."""
        idx = self.indices(step)
        pixels = self.images[idx].to(self.device, non_blocking=True)
        generator = step_generator(self.seed, step, self.rank, _SALT_DATA, device=self.device)
        x = to_unit_interval(pixels, self.dequantize, generator)
        if self.flip:
            x = random_hflip(x, generator)
        x = self.scaler(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def labelled_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch(step)` and the class labels of its images (the stream must have been given labels)."""
        if self.labels is None:
            raise UserError("this image data set has no class labels (class-conditional training needs digits "
                            "or cifar10)")
        if self.labels.device != self.images.device:
            self.labels = self.labels.to(self.images.device)
        return self.batch(step), self.labels[self.indices(step)].to(self.device, non_blocking=True)


SINGLE_SPLIT_SETS = ("digits", "image_folder")  # one set of images, which training uses: no held-out test split


def load_image_dataset(config, split: str = "train") -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images (N, C, H, W) and labels (or None) of config.data.dataset, checked against the config.

    digits and image folders have one split, "train" (all their images); asking for "test" is a UserError rather
    than the training images under another name."""
    name = str(config.data.dataset).lower()
    if name in SINGLE_SPLIT_SETS and split != "train":
        raise UserError(f"data set {name!r} has one split, 'train' (all its images, which training uses), no "
                        f"held-out {split!r} split: use --split train (config likelihood.split / eval.split)")
    if name == "digits":
        images, labels = load_digits_uint8()
    elif name == "cifar10":
        from data.cifar10 import load_cifar10

        images, labels = load_cifar10(str(config.data.path), split)
    elif name == "image_folder":
        images, labels = load_image_folder(str(config.data.path), int(config.data.image_size),
                                           int(config.data.num_channels)), None
    else:
        raise UserError(f"unknown image data set {config.data.dataset!r}; valid: {', '.join(IMAGE_SETS)}")
    check_uint8_images(images, f"data set {name!r}", channels=int(config.data.num_channels),
                       size=int(config.data.image_size))
    return images, labels


def data_shape(config) -> tuple[int, ...]:
    """Shape of one training example: (dim,) for toys, (C, H, W) for images."""
    if config.data.kind == "image":
        return (int(config.data.num_channels), int(config.data.image_size), int(config.data.image_size))
    return (int(config.data.dim),)


def get_data_stream(config, batch_size: int, *, rank: int = 0, world_size: int = 1, device="cpu",
                    channels_last: bool = False):
    """The training stream for config.data: `.batch(step)` gives this process's batch at that step."""
    name = str(config.data.dataset).lower()
    kind = str(config.data.kind)
    if kind == "toy":
        if name not in toy_names():
            raise UserError(f"data.kind='toy' but data.dataset={config.data.dataset!r} is not a toy; "
                            f"valid: {', '.join(toy_names())}")
        dim = TOY_MIXTURES[name]().dim if name in TOY_MIXTURES else 2
        if int(config.data.dim) != dim:
            raise UserError(f"data.dim={config.data.dim} but the toy {name!r} is {dim}-dimensional")
        return ToyStream(name, batch_size, int(config.seed), rank, device)
    if kind != "image":
        raise UserError(f"unknown data.kind {kind!r}; valid: toy, image")
    images, labels = load_image_dataset(config, "train")
    keep = bool(config.training.get("data_on_device", True))
    return ImageStream(images, batch_size, int(config.seed), rank=rank, world_size=world_size, device=device,
                       dequantize=bool(config.data.uniform_dequantization), flip=bool(config.data.random_flip),
                       scaler=get_data_scaler(config), keep_on_device=keep, channels_last=channels_last,
                       labels=labels)


def dataset_num_classes(config) -> int:
    """Number of classes of config.data.dataset: mixture components (toys), 10 (digits, cifar10), else 0."""
    name = str(config.data.dataset).lower()
    if name in TOY_MIXTURES:
        return TOY_MIXTURES[name]().num_components
    return 10 if name in ("digits", "cifar10") else 0


def check_num_classes(config) -> int:
    """config.data.num_classes, checked against the data set's classes (mixture components / 10 labels)."""
    k = int(config.data.get("num_classes", 0))
    if k <= 0:
        return 0
    expected = dataset_num_classes(config)
    if expected == 0:
        raise UserError(f"data.num_classes={k} but data set {config.data.dataset!r} has no class labels; "
                        f"labelled sets: {', '.join(list(TOY_MIXTURES) + ['digits', 'cifar10'])}")
    if k != expected:
        raise UserError(f"data.num_classes={k} but {config.data.dataset!r} has {expected} classes")
    return k
