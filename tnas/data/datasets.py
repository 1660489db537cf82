"""The dataset registry (`DATASETS`) and `load_split`, the one entry point from a dataset name to
an `ImageSplit` backed by the uint8 cache.

Normalisation: ``ImageSplit.mean`` / ``.std`` are the per-channel statistics of the dataset's
*train* split at the same size, channels and options (computed once, stored in the cache), so
train, val and test are normalised alike. Loading val or test therefore builds the train
cache too if it is missing; if the train split is not on disk at all, the split's own
statistics are used. ``normalize="imagenet"`` uses the ImageNet mean/std instead, as the
original T-NAS code does for mini-ImageNet (RGB only).

Resize: images of another size are resized with Lanczos (default) or bilinearly
(``resize="bilinear"``, the original's torchvision ``Resize``); the method is part of the
cache key and of the entry's fingerprint, so each method has its own cache entry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

from tnas.data.cache import CacheEntry, RawSplit, SplitSource, default_cache_dir, entry_directory, open_cache_entry
from tnas.data import formats
from tnas.data.decode import RESAMPLING
from tnas.data.glyphs import find_glyphs
from tnas.data.split import ImageSplit
from tnas.errors import TnasError

__all__ = ["DATASETS", "DatasetSpec", "load_split", "get_dataset", "SPLITS", "NORMALIZATIONS", "RESIZE_METHODS",
           "IMAGENET_MEAN", "IMAGENET_STD"]

SPLITS = ("train", "val", "test")
NORMALIZATIONS = ("split", "imagenet")
RESIZE_METHODS = tuple(RESAMPLING)  # ("lanczos", "bilinear"); the first is the default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetSpec:
    """How to find a dataset on disk and what it looks like by default."""

    name: str
    default_img_size: int
    default_channels: int
    needs_data_path: bool
    layout: str
    description: str
    find: Callable[[Optional[str], str, Dict[str, Any]], SplitSource]
    options: Dict[str, Any] = field(default_factory=dict)

    def resolve_options(self, options: Dict[str, Any]) -> Dict[str, Any]:
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TnasError(f"dataset '{self.name}' has no option '{unknown[0]}' (its options: {known})")
        resolved = dict(self.options)
        resolved.update(options)
        return resolved


DATASETS: Dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("miniimagenet", 84, 3, True, formats.MINI_LAYOUT,
                    "mini-ImageNet, 64/16/20 classes of 600 images (Ravi & Larochelle split)",
                    formats.find_miniimagenet),
        DatasetSpec("omniglot", 28, 1, True, formats.OMNIGLOT_LAYOUT,
                    "Omniglot, 1,623 handwritten characters: 1100/100/423 train/val/test",
                    formats.find_omniglot, {"rotations": False}),
        DatasetSpec("cifar_fs", 32, 3, True, formats.CIFAR_LAYOUT,
                    "CIFAR-FS, CIFAR-100 split 64/16/20 by class (Bertinetto et al. 2019)", formats.find_cifar_fs),
        DatasetSpec("fc100", 32, 3, True, formats.CIFAR_LAYOUT,
                    "FC100, CIFAR-100 split 12/4/4 by superclass = 60/20/20 classes (Oreshkin et al. 2018)",
                    formats.find_fc100),
        DatasetSpec("tieredimagenet", 84, 3, True, formats.TIERED_LAYOUT,
                    "tieredImageNet, 351/97/160 classes (Ren et al. 2018)", formats.find_tieredimagenet),
        DatasetSpec("folder", 84, 3, True, formats.FOLDER_LAYOUT,
                    "your own images: DIR/{train,val,test}/<class>/*.png|jpg", formats.find_folder),
        DatasetSpec("glyphs", 28, 1, False, "nothing: rendered from matplotlib's bundled fonts",
                    "embedded demo: characters in random fonts and jitter, 146/49/48 classes of 20 images",
                    find_glyphs, {"images_per_class": 20, "seed": 0}),
    )
}


def get_dataset(name: str) -> DatasetSpec:
    key = str(name).strip().lower().replace("-", "_")
    aliases = {"mini_imagenet": "miniimagenet", "tiered_imagenet": "tieredimagenet", "cifarfs": "cifar_fs"}
    key = aliases.get(key, key)
    if key not in DATASETS:
        raise TnasError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}")
    return DATASETS[key]


def _check_split(split: str) -> str:
    value = str(split).strip().lower()
    value = {"validation": "val", "valid": "val"}.get(value, value)
    if value not in SPLITS:
        raise TnasError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}")
    return value


def _check_size(spec: DatasetSpec, img_size: Optional[int], channels: Optional[int]) -> Tuple[int, int]:
    size = spec.default_img_size if img_size is None else img_size
    chans = spec.default_channels if channels is None else channels
    if isinstance(size, bool) or not isinstance(size, int) or not 4 <= size <= 1024:
        raise TnasError(f"--img_size must be an integer in 4..1024, got {img_size!r}")
    if isinstance(chans, bool) or chans not in (1, 3):
        raise TnasError(f"--channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return int(size), int(chans)


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
_SHAPE_CHOICES: Dict[str, Tuple[Optional[int], Optional[int], str]] = {}  # fingerprint -> choice (per process)


def folder_default_shape(root: str, split: str) -> Optional[Tuple[int, int, str]]:
    """The image side and channel count a ``folder`` dataset gets by default, and why.

    Read from the image headers of its train split (the split asked for when there is no
    train folder), so every split of a dataset gets the same shape: the side is the larger
    dimension of the most common image size; 1 channel when every image is grayscale, else 3.
    Returns ``(side, channels, reason)``, or None when neither folder exists (the reader then
    says what is missing).
    """
    from collections import Counter

    from PIL import Image

    source = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else os.path.join(root, split)
    if not os.path.isdir(source):
        return None
    paths, _, _, fingerprint = formats.scan_class_folders(source, "folder")
    if fingerprint in _SHAPE_CHOICES:
        return _SHAPE_CHOICES[fingerprint]
    sizes: Counter = Counter()
    colour = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes[image.size] += 1
                colour += image.mode not in _GRAY_MODES
        except (OSError, ValueError, Image.DecompressionBombError):  # the last is no OSError/ValueError
            continue  # decoding reports it, naming the file
    if not sizes:
        spec = DATASETS["folder"]
        return spec.default_img_size, spec.default_channels, "no readable image headers: the defaults"
    (width, height), count = sizes.most_common(1)[0]
    side = min(max(max(width, height), 4), 1024)
    total = sum(sizes.values())
    channels = 3 if colour else 1
    reason = (f"{width}x{height} is the most common image size in {source} ({count} of {total} images), so the side "
              f"is {side}; {'every image is grayscale, so 1 channel' if channels == 1 else f'{colour} of {total} images are in colour, so 3 channels'}")
    _SHAPE_CHOICES[fingerprint] = (side, channels, reason)
    return side, channels, reason


def _cached_folder_shape(cache_dir: Optional[str], root: str, split: str) -> Optional[Tuple[int, int, str]]:
    """With the raw folder gone: the shape of the newest cache entry built from ``root/split``."""
    import json

    parent = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir(),
                          "folder")
    source, found = os.path.join(root, split), []
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        try:
            with open(os.path.join(parent, name, "meta.json"), encoding="utf-8") as handle:
                meta = json.load(handle)
            if meta.get("source") == source:
                found.append((os.path.getmtime(os.path.join(parent, name, "meta.json")), meta["image_shape"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not found:
        return None
    channels, side = int(max(found)[1][0]), int(max(found)[1][1])
    return side, channels, f"{root} is gone, so the shape of its cached entry"


def _resolve_root(spec: DatasetSpec, data_path: Optional[str]) -> Optional[str]:
    if not spec.needs_data_path or data_path is None:
        return None
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(data_path))))


def _with_resize(source: SplitSource, resize: str) -> SplitSource:
    """``source`` whose images are resized with ``resize``; its fingerprint names the method."""

    def load() -> RawSplit:
        raw = source.load()
        raw.resize = resize
        return raw

    return SplitSource(f"{source.fingerprint}|resize={resize}", source.location, load)


def _open(spec: DatasetSpec, split: str, root: Optional[str], img_size: int, channels: int, cache_dir: Optional[str],
          options: Dict[str, Any], num_workers: Optional[int], progress: Optional[bool],
          resize: str = RESIZE_METHODS[0]) -> CacheEntry:
    # the default method keeps the key of caches made before the choice existed
    key_options = options if resize == RESIZE_METHODS[0] else dict(options, resize=resize)
    directory = entry_directory(cache_dir, spec.name, split, img_size, channels, root, key_options)
    try:
        source: Optional[SplitSource] = spec.find(root, split, options)
        if resize != RESIZE_METHODS[0]:
            source = _with_resize(source, resize)
        error: Optional[TnasError] = None
    except TnasError as problem:
        if spec.needs_data_path and (root is None or os.path.exists(root)):
            raise  # no path given, or the data is there but unreadable: never hide it behind a cache entry
        source, error = None, problem  # the raw data is gone altogether: an existing entry still serves
    return open_cache_entry(directory, f"{spec.name}/{split}", img_size, channels, source, error, num_workers, progress)


def load_split(dataset: str, split: str, data_path: Optional[str] = None, img_size: Optional[int] = None,
               channels: Optional[int] = None, cache_dir: Optional[str] = None, normalize: str = "split",
               resize: str = "lanczos", **options: Any) -> ImageSplit:
    """Load one split of a dataset as an `ImageSplit`, decoding it into the cache on first use.

    ``dataset``: a key of `DATASETS`; ``split``: train / val / test; ``data_path``: the
    dataset's root directory (not needed for glyphs, refused for it); ``img_size`` /
    ``channels``: default per dataset (84/3 mini- and tieredImageNet, 28/1 omniglot and glyphs,
    32/3 CIFAR-FS and FC100; for folder they follow the data, see :func:`folder_default_shape`,
    and the returned split's ``shape_note`` says what was chosen and why); ``cache_dir``:
    default ``$TNAS_CACHE_DIR`` or ``~/.cache/tnas``.
    ``normalize``: "split" (the train split's mean/std) or "imagenet" (ImageNet's, RGB only);
    ``resize``: "lanczos" or "bilinear" (see the module docstring).
    ``options``: dataset options (omniglot ``rotations``; glyphs ``images_per_class``,
    ``seed``), plus ``num_workers`` (decoding processes) and ``progress`` (tqdm bar: True,
    False, or None: ``$TNAS_PROGRESS`` 0/1, else on for a terminal), which do not change the
    cached content.
    """
    spec = get_dataset(dataset)
    split = _check_split(split)
    if normalize not in NORMALIZATIONS:
        raise TnasError(f"--normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    if resize not in RESIZE_METHODS:
        raise TnasError(f"--resize must be one of {', '.join(RESIZE_METHODS)}, got {resize!r}")
    num_workers = options.pop("num_workers", None)
    progress = options.pop("progress", None)
    resolved = spec.resolve_options(options)
    root = _resolve_root(spec, data_path)
    layout = spec.layout.replace("{split}", split)
    if spec.needs_data_path and root is None:
        raise TnasError(f"dataset '{spec.name}' needs --data_path DIR (expected layout: {layout})")
    shape_note = None
    if spec.name == "folder" and (img_size is None or channels is None) and root is not None and os.path.isdir(root):
        choice = folder_default_shape(root, split)
    elif spec.name == "folder" and (img_size is None or channels is None) and root is not None:
        choice = _cached_folder_shape(cache_dir, root, split)
    else:
        choice = None
    if choice is not None:
        side, chans, why = choice
        shape_note = (f"{spec.name} images at {img_size if img_size is not None else side}px, "
                      f"{channels if channels is not None else chans} channel(s): {why}")
        img_size = side if img_size is None else img_size
        channels = chans if channels is None else channels
    size, chans = _check_size(spec, img_size, channels)
    if normalize == "imagenet" and chans != 3:
        raise TnasError(f"--normalize imagenet needs RGB images; {spec.name} is loaded with {chans} channel(s) "
                        f"(use --normalize split)")
    if not spec.needs_data_path and data_path is not None:
        raise TnasError(f"dataset '{spec.name}' reads no files ({spec.layout}); drop --data_path {data_path}")
    entry = _open(spec, split, root, size, chans, cache_dir, resolved, num_workers, progress, resize)
    mean, std = entry.meta["pixel_mean"], entry.meta["pixel_std"]
    if normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif split != "train":
        try:
            train = _open(spec, "train", root, size, chans, cache_dir, resolved, num_workers, progress, resize)
            mean, std = train.meta["pixel_mean"], train.meta["pixel_std"]
        except TnasError:
            pass  # no train split on disk: normalise with this split's own statistics
    loaded = ImageSplit(images=entry.images, labels=entry.labels, class_names=list(entry.meta["class_names"]),
                        name=f"{spec.name}/{split}", mean=tuple(mean), std=tuple(std), cache_path=entry.directory)
    loaded.shape_note = shape_note  # why a folder dataset got its default size and channels (None otherwise)
    return loaded
