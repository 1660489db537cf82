"""`ImageSplit`: the decoded images of one split of a dataset, and views of subsets of it.

An `ImageSplit` is what every reader ends up as once its images are in the uint8 cache:

- ``images``: ``np.ndarray`` uint8 of shape (N, H, W, C), usually a read-only memory map;
- ``labels``: ``np.ndarray`` int64 of shape (N,), values in ``0 .. num_classes-1``;
- ``class_names``: one name per class (``class_names[label]``);
- ``name``: ``"<dataset>/<split>"``, used in messages and checked by saved evaluation episodes;
- ``mean`` / ``std``: one float per channel, in [0, 1] units, used by the episode samplers
  to normalise (``(x / 255 - mean) / std``).

Nothing here decodes files or touches torch; see :mod:`tnas.data.cache` for that.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from tnas.errors import TnasError

__all__ = ["ImageSplit", "split_subset", "split_images_in_half", "synthetic_split"]


@dataclass(eq=False)
class ImageSplit:
    """Decoded images of one split (see the module docstring for the fields)."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list
    name: str
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    cache_path: Optional[str] = None
    _class_index: Optional[tuple] = field(default=None, init=False, repr=False)
    _channels_first: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TnasError(f"{self.name}: images must be a uint8 array of shape (N, H, W, C), "
                            f"got {getattr(self.images, 'dtype', type(self.images))} "
                            f"{getattr(self.images, 'shape', '')}")
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != self.images.shape[0]:
            raise TnasError(f"{self.name}: labels must have shape ({self.images.shape[0]},), got {labels.shape}")
        if labels.dtype != np.int64:
            labels = labels.astype(np.int64)
        self.labels = labels
        self.class_names = [str(name) for name in self.class_names]
        if labels.size and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise TnasError(f"{self.name}: labels must lie in 0..{len(self.class_names) - 1}, "
                            f"found {int(labels.min())}..{int(labels.max())}")
        channels = self.images.shape[3]
        if channels not in (1, 3):
            raise TnasError(f"{self.name}: images must have 1 or 3 channels, got {channels}")
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise TnasError(f"{self.name}: mean/std need {channels} values, got {self.mean} / {self.std}")
        if min(self.std) <= 0:
            raise TnasError(f"{self.name}: std must be positive, got {self.std}")

    def __repr__(self) -> str:
        """One line (the dataclass default would print every image and class name)."""
        return (f"ImageSplit({self.name!r}: {self.images.shape[0]} images of {self.num_classes} classes, "
                f"{'x'.join(map(str, self.image_shape))} [C, H, W])")

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        """(C, H, W), the layout of the tensors the samplers deliver."""
        _, height, width, channels = self.images.shape
        return (channels, height, width)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def class_counts(self) -> np.ndarray:
        """Number of images of each class, shape (num_classes,)."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def class_index(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, offsets, counts): ``order[offsets[c]:offsets[c]+counts[c]]`` are class c's images."""
        if self._class_index is None:
            order = np.argsort(self.labels, kind="stable").astype(np.int64)
            counts = self.class_counts().astype(np.int64)
            offsets = np.zeros_like(counts)
            np.cumsum(counts[:-1], out=offsets[1:])
            self._class_index = (order, offsets, counts)
        return self._class_index

    def images_channels_first(self) -> np.ndarray:
        """The images as (N, C, H, W) uint8: a free view for one channel, else a copy made once
        and kept (episode samplers gather whole images from it, avoiding a transpose per batch)."""
        if self.images.shape[3] == 1:
            count, height, width, _ = self.images.shape
            return self.images.reshape(count, 1, height, width)
        if self._channels_first is None:
            out = np.empty((self.images.shape[0], self.images.shape[3]) + self.images.shape[1:3], np.uint8)
            step = 4096
            for start in range(0, self.images.shape[0], step):
                out[start:start + step] = np.asarray(self.images[start:start + step]).transpose(0, 3, 1, 2)
            self._channels_first = out
        return self._channels_first

    def labels_fingerprint(self) -> str:
        """Short hash of the labels, used to check that saved episodes belong to this split."""
        digest = hashlib.sha1(np.ascontiguousarray(self.labels).tobytes())
        digest.update(repr(tuple(self.images.shape)).encode())
        return digest.hexdigest()[:16]

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: Sequence[int], class_names: Optional[Sequence[str]] = None,
                    name: str = "arrays/train", mean: Optional[Sequence[float]] = None,
                    std: Optional[Sequence[float]] = None) -> "ImageSplit":
        """An in-memory split; mean/std default to the statistics of ``images``."""
        images = np.asarray(images)
        if images.ndim == 3:
            images = images[..., None]
        labels = np.asarray(labels, dtype=np.int64)
        if class_names is None:
            class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
        if mean is None or std is None:
            stat_mean, stat_std = channel_statistics(images)
            mean = stat_mean if mean is None else mean
            std = stat_std if std is None else std
        return cls(images=images, labels=labels, class_names=list(class_names), name=name, mean=tuple(mean),
                   std=tuple(std))


def channel_statistics(images: np.ndarray, chunk: int = 2048) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of uint8 images (N, H, W, C), in [0, 1] units, computed in chunks."""
    channels = images.shape[-1]
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        block = np.asarray(images[start:start + chunk], dtype=np.float64).reshape(-1, channels)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
        count += block.shape[0]
    if count == 0:
        return tuple([0.5] * channels), tuple([0.25] * channels)
    mean = total / count
    var = np.maximum(total_sq / count - mean ** 2, 0.0)
    std = np.sqrt(var)
    std = np.where(std < 1e-3, 1.0 * 255, std)  # constant images: do not blow up
    return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)


def split_subset(split: ImageSplit, images: Union[np.ndarray, Sequence[int]], name: Optional[str] = None) -> ImageSplit:
    """A new `ImageSplit` holding the selected images (boolean mask of length N, or indices).

    The images are copied into memory (for a memory-mapped split, only the selected rows are
    read). Classes that keep no image are dropped and the labels renumbered in the original
    class order; mean/std are kept from ``split`` so the subset is normalised the same way.
    """
    selection = np.asarray(images)
    if selection.dtype == bool:
        if selection.shape != (len(split),):
            raise TnasError(f"{split.name}: a mask must have shape ({len(split)},), got {selection.shape}")
        indices = np.flatnonzero(selection)
    else:
        indices = selection.astype(np.int64).reshape(-1)
        if indices.size and (indices.min() < -len(split) or indices.max() >= len(split)):
            raise TnasError(f"{split.name}: image indices must lie in 0..{len(split) - 1}")
    labels = split.labels[indices]
    present = np.unique(labels)
    if present.size == split.num_classes:
        new_labels, class_names = labels, list(split.class_names)
    else:
        remap = np.full(split.num_classes, -1, np.int64)
        remap[present] = np.arange(present.size)
        new_labels = remap[labels]
        class_names = [split.class_names[c] for c in present]
    return ImageSplit(images=np.ascontiguousarray(split.images[indices]), labels=new_labels,
                      class_names=class_names, name=name or f"{split.name}[subset]", mean=split.mean,
                      std=split.std)


def split_images_in_half(split: ImageSplit, seed: int = 0) -> Tuple[ImageSplit, ImageSplit]:
    """Split every class's images 1:1 at random into two `ImageSplit`s with the same classes.

    Used by auto-MAML (one half updates the weights, the other the architecture). A class with
    c images gives ``(c + 1) // 2`` to the first half and ``c // 2`` to the second; every class
    needs at least 2 images. Deterministic for a given ``seed``; images keep their order.
    """
    counts = split.class_counts()
    if split.num_classes and counts.min() < 2:
        worst = int(np.argmin(counts))
        raise TnasError(f"{split.name}: class '{split.class_names[worst]}' has {int(counts[worst])} image(s); "
                        f"splitting every class in half needs at least 2")
    rng = np.random.default_rng(seed)
    keys = rng.random(len(split))
    order = np.lexsort((keys, split.labels))  # by class, random within class
    _, offsets, _ = split.class_index()
    rank = np.empty(len(split), np.int64)
    rank[order] = np.arange(len(split)) - offsets[split.labels[order]]
    first = rank < (counts[split.labels] + 1) // 2
    half_a = split_subset(split, first, name=f"{split.name}[half0]")
    half_b = split_subset(split, ~first, name=f"{split.name}[half1]")
    return half_a, half_b


def synthetic_split(num_classes: int = 10, images_per_class: int = 20, img_size: int = 28, channels: int = 1,
                    seed: int = 0, name: str = "synthetic/train") -> ImageSplit:
    """A tiny learnable in-memory split for unit tests: each class is a random pattern plus noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, size=(num_classes, img_size, img_size, channels))
    noise = rng.normal(0.0, 30.0, size=(num_classes, images_per_class, img_size, img_size, channels))
    images = np.clip(prototypes[:, None] + noise, 0, 255).astype(np.uint8)
    images = images.reshape(num_classes * images_per_class, img_size, img_size, channels)
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), images_per_class)
    return ImageSplit.from_arrays(images, labels, [f"class{c:03d}" for c in range(num_classes)], name=name)
