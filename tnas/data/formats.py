"""Readers: find one split of a dataset on disk and describe how to decode it.

Each ``find_<dataset>(root, split, options)`` returns a :class:`~tnas.data.cache.SplitSource`
(cheap: it lists files or stats pickles and computes a fingerprint) whose ``load()`` returns a
:class:`~tnas.data.cache.RawSplit` (the heavy part: reading pickles). Every problem is a
one-line :class:`~tnas.errors.TnasError` naming the file and the layout that was expected.
The layouts are documented in ``docs/datasets.md``.
"""
from __future__ import annotations

import csv
import hashlib
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from tnas.data.cache import RawSplit, SplitSource, files_fingerprint
from tnas.data.safe_pickle import load_pickle, normalise_keys
from tnas.errors import TnasError
from tnas.files import NPZ_READ_ERRORS

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SPLITS = ("train", "val", "test")

# ----------------------------------------------------------------------------- helpers


def _stat_fingerprint(paths: Iterable[str], extra: str = "") -> str:
    digest = hashlib.sha1(extra.encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def _require_root(dataset: str, root: Optional[str], layout: str) -> str:
    if root is None:
        raise TnasError(f"dataset '{dataset}' needs --data_path DIR ({layout})")
    if not os.path.isdir(root):
        raise TnasError(f"--data_path {root} is not a directory (dataset '{dataset}' expects {layout})")
    return root


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _list_images(directory: str) -> List[str]:
    return sorted(n for n in os.listdir(directory)
                  if _visible(n) and n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, n)))


def scan_class_folders(split_dir: str, dataset: str) -> Tuple[List[str], np.ndarray, List[str], str]:
    """``split_dir/<class>/*.{png,jpg,...}`` -> (paths, labels, class names sorted, fingerprint)."""
    classes = sorted(n for n in os.listdir(split_dir) if _visible(n) and os.path.isdir(os.path.join(split_dir, n)))
    if not classes:
        raise TnasError(f"{dataset}: {split_dir} has no class folders; expected {split_dir}/<class>/*.png|jpg")
    paths: List[str] = []
    labels: List[int] = []
    relative: List[str] = []
    for label, name in enumerate(classes):
        files = _list_images(os.path.join(split_dir, name))
        if not files:
            raise TnasError(f"{dataset}: class folder {os.path.join(split_dir, name)} holds no .png/.jpg/.jpeg images")
        paths.extend(os.path.join(split_dir, name, f) for f in files)
        labels.extend([label] * len(files))
        relative.extend(f"{name}/{f}" for f in files)
    return paths, np.asarray(labels, np.int64), classes, files_fingerprint(paths, relative, split_dir)


def _labels_from_values(values: Sequence[Any]) -> Tuple[np.ndarray, List[Any]]:
    """Arbitrary per-image class values -> (labels 0..C-1, sorted distinct values)."""
    distinct, labels = np.unique(np.asarray(values), return_inverse=True)
    return labels.astype(np.int64).reshape(-1), list(distinct)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _uint8_images(value: Any, path: str, what: str) -> np.ndarray:
    array = np.asarray(value)
    # (N, H, W) grayscale or (N, H, W, 1|3); another channel count would be read as gray without a word
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 3)) \
            or 0 in array.shape[1:3]:
        raise TnasError(f"{path}: '{what}' should be uint8 images (N, H, W, 3), got {array.dtype} {array.shape}")
    return array


# ----------------------------------------------------------------------------- mini-ImageNet

MINI_LAYOUT = ("images/*.jpg + {split}.csv (Ravi & Larochelle), or {split}/<wnid>/*.jpg, "
               "or mini-imagenet-cache-{split}.pkl")


def _mini_pickle_names(split: str) -> List[str]:
    names = [f"mini-imagenet-cache-{split}.pkl"]
    if split == "val":
        names.append("mini-imagenet-cache-validation.pkl")
    return names


def find_miniimagenet(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    root = _require_root("miniimagenet", root, MINI_LAYOUT.format(split=split))
    for name in _mini_pickle_names(split):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return SplitSource(_stat_fingerprint([path], "mini-pkl"), path, lambda p=path: _load_mini_pickle(p))
    csv_path = os.path.join(root, f"{split}.csv")
    if os.path.isfile(csv_path):
        return _mini_csv_source(root, csv_path)
    split_dir = os.path.join(root, split)
    if os.path.isdir(split_dir):
        paths, labels, classes, fingerprint = scan_class_folders(split_dir, "miniimagenet")
        return SplitSource(fingerprint, split_dir, lambda: RawSplit(labels, classes, split_dir, paths=paths))
    raise TnasError(f"miniimagenet: no '{split}' split under {root}; expected {MINI_LAYOUT.format(split=split)}")


def _mini_csv_source(root: str, csv_path: str) -> SplitSource:
    images_dir = os.path.join(root, "images")
    if not os.path.isdir(images_dir):
        raise TnasError(f"miniimagenet: found {csv_path} but no {images_dir}/ directory with the .jpg files")
    try:
        with open(csv_path, "r", encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except UnicodeDecodeError:
        raise TnasError(f"{csv_path}: not UTF-8 text; expected the header 'filename,label' and one "
                        f"'<file>.jpg,<class>' line per image") from None
    except (OSError, csv.Error) as error:
        raise TnasError(f"cannot read {csv_path}: {getattr(error, 'strerror', None) or error}") from None
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["filename", "label"]:
        header = ",".join(rows[0]) if rows else "(empty file)"
        raise TnasError(f"{csv_path}: expected the header 'filename,label', found '{header}'")
    body = [r for r in rows[1:] if r and any(c.strip() for c in r)]
    bad = [i + 2 for i, r in enumerate(body) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise TnasError(f"{csv_path}: line {bad[0]} does not have the form 'filename,label'")
    filenames = [r[0].strip() for r in body]
    present = set(os.listdir(images_dir))
    missing = [f for f in filenames if f not in present]
    if missing:
        raise TnasError(f"{csv_path}: {len(missing)} listed image(s) missing from {images_dir}, e.g. {missing[0]}")
    labels, classes = _labels_from_values([r[1].strip() for r in body])
    paths = [os.path.join(images_dir, f) for f in filenames]
    with open(csv_path, "rb") as handle:
        fingerprint = files_fingerprint(paths, None, hashlib.sha1(handle.read()).hexdigest())
    classes = [str(c) for c in classes]
    return SplitSource(fingerprint, csv_path, lambda: RawSplit(labels, classes, csv_path, paths=paths))


def _load_mini_pickle(path: str) -> RawSplit:
    data = normalise_keys(load_pickle(path))
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise TnasError(f"{path}: expected a dict with keys 'image_data' and 'class_dict', found {found}")
    images = _uint8_images(data["image_data"], path, "image_data")
    class_dict = normalise_keys(data["class_dict"])
    if not isinstance(class_dict, dict) or not class_dict:
        raise TnasError(f"{path}: 'class_dict' should map class names to image indices")
    classes = sorted(class_dict, key=_text)
    try:
        rows_per_class = [np.asarray(class_dict[c], dtype=np.int64).reshape(-1) for c in classes]
    except (TypeError, ValueError, OverflowError):
        raise TnasError(f"{path}: 'class_dict' should map each class name to a list of image indices "
                        f"(integers)") from None
    rows = np.concatenate(rows_per_class) if rows_per_class else np.zeros(0, np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= images.shape[0]):
        raise TnasError(f"{path}: 'class_dict' refers to image {int(rows.max())} but 'image_data' has {images.shape[0]}")
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [r.size for r in rows_per_class])
    return RawSplit(labels, [_text(c) for c in classes], path, array=images, rows=rows)


# ----------------------------------------------------------------------------- Omniglot

OMNIGLOT_LAYOUT = "images_background/<Alphabet>/characterNN/*.png and images_evaluation/<Alphabet>/characterNN/*.png"
OMNIGLOT_SETS = ("images_background", "images_evaluation")


def omniglot_characters(root: str) -> List[Tuple[str, str, str]]:
    """All characters as (set, alphabet, character), in the order that defines the split."""
    base = root
    if not any(os.path.isdir(os.path.join(base, s)) for s in OMNIGLOT_SETS):
        nested = os.path.join(root, "omniglot-py")  # torchvision's download layout
        if any(os.path.isdir(os.path.join(nested, s)) for s in OMNIGLOT_SETS):
            base = nested
        else:
            raise TnasError(f"omniglot: neither images_background/ nor images_evaluation/ found under {root}; "
                            f"expected {OMNIGLOT_LAYOUT}")
    characters = []
    for subset in OMNIGLOT_SETS:
        subset_dir = os.path.join(base, subset)
        if not os.path.isdir(subset_dir):
            continue
        for alphabet in sorted(filter(_visible, os.listdir(subset_dir))):
            alphabet_dir = os.path.join(subset_dir, alphabet)
            if not os.path.isdir(alphabet_dir):
                continue
            for character in sorted(filter(_visible, os.listdir(alphabet_dir))):
                if os.path.isdir(os.path.join(alphabet_dir, character)):
                    characters.append((os.path.join(base, subset), alphabet, character))
    if not characters:
        raise TnasError(f"omniglot: no character folders under {base}; expected {OMNIGLOT_LAYOUT}")
    return characters


def omniglot_split_sizes(total: int) -> Tuple[int, int, int]:
    """(train, val, test) character counts: 1100/100/423 for the full 1,623; same proportions otherwise."""
    train_and_val = int(round(total * 1200 / 1623))
    val = max(1, int(round(total * 100 / 1623))) if train_and_val >= 2 else 0
    val = min(val, train_and_val - 1) if train_and_val >= 2 else 0
    return train_and_val - val, val, total - train_and_val


def find_omniglot(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    root = _require_root("omniglot", root, OMNIGLOT_LAYOUT)
    characters = omniglot_characters(root)
    n_train, n_val, _ = omniglot_split_sizes(len(characters))
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(characters))}
    start, stop = bounds[split]
    chosen = characters[start:stop]
    if not chosen:
        raise TnasError(f"omniglot: only {len(characters)} characters under {root}, none left for the '{split}' split")
    paths: List[str] = []
    labels: List[int] = []
    names: List[str] = []
    relative: List[str] = []
    for label, (subset_dir, alphabet, character) in enumerate(chosen):
        directory = os.path.join(subset_dir, alphabet, character)
        files = _list_images(directory)
        if not files:
            raise TnasError(f"omniglot: character folder {directory} holds no .png images")
        paths.extend(os.path.join(directory, f) for f in files)
        labels.extend([label] * len(files))
        names.append(f"{alphabet}/{character}")
        relative.extend(f"{alphabet}/{character}/{f}" for f in files)
    label_array = np.asarray(labels, np.int64)
    rotations = bool(options.get("rotations", False))
    postprocess = _rotate_classes if rotations else None
    fingerprint = files_fingerprint(paths, relative, f"omniglot:{len(characters)}")
    return SplitSource(fingerprint, root, lambda: RawSplit(label_array, names, root, paths=paths,
                                                           postprocess=postprocess))


def _rotate_classes(images: np.ndarray, labels: np.ndarray, names: List[str]) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """Each class c becomes 4 classes 4c+r, r = 0..3 for rotations by 0/90/180/270 degrees."""
    rotated = np.concatenate([np.rot90(images, k=r, axes=(1, 2)) for r in range(4)], axis=0)
    new_labels = np.concatenate([labels * 4 + r for r in range(4)])
    new_names = [f"{name}/rot{90 * r:03d}" for name in names for r in range(4)]
    return rotated, new_labels, new_names


# ----------------------------------------------------------------------------- CIFAR-100 based

CIFAR_LAYOUT = "cifar-100-python/{train,test,meta} (the CIFAR-100 python pickles)"

# FC100 (Oreshkin et al., 2018, TADAM): split by superclass, 12 / 4 / 4.
# Superclass indices in CIFAR-100's coarse label order:
# train 1,2,3,4,5,6,9,10,15,17,18,19; val 8,11,13,16; test 0,7,12,14.
FC100_SUPERCLASSES = {
    "train": ["fish", "flowers", "food_containers", "fruit_and_vegetables", "household_electrical_devices",
              "household_furniture", "large_man-made_outdoor_things", "large_natural_outdoor_scenes", "reptiles",
              "trees", "vehicles_1", "vehicles_2"],
    "val": ["large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"],
    "test": ["aquatic_mammals", "insects", "medium_mammals", "people"],
}


def _cifar_dir(root: str) -> str:
    for candidate in (root, os.path.join(root, "cifar-100-python")):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in ("train", "test", "meta")):
            return candidate
    missing = [f for f in ("train", "test", "meta") if not os.path.isfile(os.path.join(root, "cifar-100-python", f))]
    raise TnasError(f"CIFAR-100 pickles not found under {root}: missing cifar-100-python/{', '.join(missing)}; "
                    f"expected {CIFAR_LAYOUT}")


def _load_cifar(directory: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray, List[str], List[str]]:
    meta_path = os.path.join(directory, "meta")
    meta = normalise_keys(load_pickle(meta_path))
    if not isinstance(meta, dict) or not {"fine_label_names", "coarse_label_names"} <= set(meta):
        found = sorted(map(str, meta)) if isinstance(meta, dict) else type(meta).__name__
        raise TnasError(f"{meta_path}: expected keys 'fine_label_names' and 'coarse_label_names', found {found}")
    for key in ("fine_label_names", "coarse_label_names"):
        if not isinstance(meta[key], (list, tuple, np.ndarray)):
            raise TnasError(f"{meta_path}: '{key}' should be a list of class names, found {type(meta[key]).__name__}")
    fine_names = [_text(n) for n in meta["fine_label_names"]]
    coarse_names = [_text(n) for n in meta["coarse_label_names"]]
    images, fine, coarse = [], [], []
    for part in ("train", "test"):
        path = os.path.join(directory, part)
        data = normalise_keys(load_pickle(path))
        if not isinstance(data, dict) or not {"data", "fine_labels", "coarse_labels"} <= set(data):
            found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise TnasError(f"{path}: expected keys 'data', 'fine_labels' and 'coarse_labels', found {found}")
        array = np.asarray(data["data"])
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != 3072:
            raise TnasError(f"{path}: 'data' should be uint8 of shape (N, 3072), got {array.dtype} {array.shape}")
        try:
            labels_fine = np.asarray(data["fine_labels"], np.int64)
            labels_coarse = np.asarray(data["coarse_labels"], np.int64)
        except (TypeError, ValueError, OverflowError):
            raise TnasError(f"{path}: 'fine_labels' and 'coarse_labels' should be lists of integers") from None
        if labels_fine.shape != (array.shape[0],) or labels_coarse.shape != (array.shape[0],):
            raise TnasError(f"{path}: {array.shape[0]} images but {labels_fine.size} fine / {labels_coarse.size} coarse labels")
        images.append(array.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        fine.append(labels_fine)
        coarse.append(labels_coarse)
    return (np.ascontiguousarray(np.concatenate(images)), np.concatenate(fine), np.concatenate(coarse),
            fine_names, coarse_names)


def cifar_fs_classes(split: str) -> List[str]:
    """The CIFAR-FS class names of a split (Bertinetto et al., 2019), shipped in tnas/data/splits/."""
    path = os.path.join(os.path.dirname(__file__), "splits", f"cifar_fs_{split}.txt")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip() and not line.startswith("#")]
    except OSError:
        raise TnasError(f"the CIFAR-FS class list {path} is missing from the installed package") from None


def _cifar_source(root: Optional[str], split: str, dataset: str) -> SplitSource:
    root = _require_root(dataset, root, CIFAR_LAYOUT)
    directory = _cifar_dir(root)
    files = [os.path.join(directory, f) for f in ("train", "test", "meta")]
    fingerprint = _stat_fingerprint(files, dataset)

    def load() -> RawSplit:
        images, fine, coarse, fine_names, coarse_names = _load_cifar(directory)
        if dataset == "cifar_fs":
            wanted = cifar_fs_classes(split)
            unknown = [n for n in wanted if n not in fine_names]
            if unknown:
                raise TnasError(f"{directory}/meta: CIFAR-FS class '{unknown[0]}' is not a fine label name "
                                f"(found {len(fine_names)} names, e.g. {fine_names[:3]})")
            class_ids = sorted(fine_names.index(n) for n in wanted)
        else:
            wanted = FC100_SUPERCLASSES[split]
            unknown = [n for n in wanted if n not in coarse_names]
            if unknown:
                raise TnasError(f"{directory}/meta: FC100 superclass '{unknown[0]}' is not a coarse label name "
                                f"(found {coarse_names[:4]}...)")
            coarse_ids = {coarse_names.index(n) for n in wanted}
            class_ids = sorted({int(f) for f, c in zip(fine, coarse) if int(c) in coarse_ids})
        remap = np.full(len(fine_names), -1, np.int64)
        remap[class_ids] = np.arange(len(class_ids))
        rows = np.flatnonzero(remap[fine] >= 0)
        absent = [fine_names[c] for c in class_ids if not np.any(fine == c)]
        if absent:
            raise TnasError(f"{directory}: no images of class '{absent[0]}' in the train/test pickles")
        return RawSplit(remap[fine[rows]], [fine_names[c] for c in class_ids], directory, array=images, rows=rows)

    return SplitSource(fingerprint, directory, load)


def find_cifar_fs(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    return _cifar_source(root, split, "cifar_fs")


def find_fc100(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    return _cifar_source(root, split, "fc100")


# ----------------------------------------------------------------------------- tieredImageNet

TIERED_LAYOUT = "{split}_images_png.pkl or {split}_images.npz, with {split}_labels.pkl"


def find_tieredimagenet(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    root = _require_root("tieredimagenet", root, TIERED_LAYOUT.format(split=split))
    npz = os.path.join(root, f"{split}_images.npz")
    png = os.path.join(root, f"{split}_images_png.pkl")
    labels_path = os.path.join(root, f"{split}_labels.pkl")
    images_path = npz if os.path.isfile(npz) else png if os.path.isfile(png) else None
    if images_path is None:
        raise TnasError(f"tieredimagenet: neither {npz} nor {png} exists; expected {TIERED_LAYOUT.format(split=split)} "
                        f"in {root}")
    have_labels = os.path.isfile(labels_path)
    if not have_labels and images_path == png:
        raise TnasError(f"tieredimagenet: {labels_path} is missing (needed with {os.path.basename(png)})")
    files = [images_path] + ([labels_path] if have_labels else [])
    # the npz is read as BGR (see _tiered_npz); "-bgr" retires caches built when it was read as RGB
    fingerprint = _stat_fingerprint(files, "tiered-bgr" if images_path == npz else "tiered")

    def load() -> RawSplit:
        values, names = _tiered_labels(labels_path if have_labels else None, images_path)
        if images_path == npz:
            array, npz_values = _tiered_npz(npz)
            if values is None:
                values = npz_values
            if values is None:
                raise TnasError(f"tieredimagenet: {labels_path} is missing and {npz} has no 'labels' array")
            if len(values) != array.shape[0]:
                raise TnasError(f"tieredimagenet: {npz} has {array.shape[0]} images but the labels have {len(values)}")
            labels, distinct = _labels_from_values(values)
            return RawSplit(labels, _tiered_names(distinct, names), npz, array=array)
        encoded = load_pickle(png)
        if isinstance(encoded, dict):
            raise TnasError(f"{png}: expected a list of PNG-encoded images, found a dict with keys {sorted(map(str, encoded))}")
        if not isinstance(encoded, (list, tuple, np.ndarray)) or np.ndim(encoded) == 0:
            raise TnasError(f"{png}: expected a list of PNG-encoded images, found {type(encoded).__name__}")
        if len(encoded) != len(values):
            raise TnasError(f"tieredimagenet: {png} has {len(encoded)} images but {labels_path} has {len(values)} labels")
        labels, distinct = _labels_from_values(values)
        return RawSplit(labels, _tiered_names(distinct, names), png, encoded=encoded)

    return SplitSource(fingerprint, images_path, load)


def _tiered_labels(path: Optional[str], images_path: str) -> Tuple[Optional[np.ndarray], Optional[List[str]]]:
    if path is None:
        return None, None
    data = normalise_keys(load_pickle(path))
    if not isinstance(data, dict) or "label_specific" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise TnasError(f"{path}: expected a dict with key 'label_specific' (fine class per image), found {found}")
    values = np.asarray(data["label_specific"]).reshape(-1)
    names = data.get("label_specific_str")
    if names is not None and not isinstance(names, (list, tuple, np.ndarray)):
        raise TnasError(f"{path}: 'label_specific_str' should be a list of class names, found {type(names).__name__}")
    return values, ([_text(n) for n in names] if names is not None else None)


def _tiered_npz(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The images (RGB, as the PNG pickle decodes) and the labels, if any, of a tieredImageNet ``.npz``.

    The ``.npz`` files in circulation come from the release's conversion script, which decodes the
    PNG pickle with OpenCV and so stores the channels in BGR order; they are turned back to RGB here
    (a view), so both layouts give the same images and ``--normalize imagenet`` its own channels."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise TnasError(f"cannot read {path}: {error.strerror or error}") from None
    if magic not in (b"PK\x03\x04", b"PK\x05\x06"):  # np.load would take any other file for a pickle
        raise TnasError(f"{path}: not an .npz file (a zip archive of .npy arrays, as np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise TnasError(f"{path}: expected the key 'images', found {sorted(archive.files)}")
            images = _uint8_images(archive["images"], path, "images")
            if images.ndim == 4 and images.shape[-1] == 3:
                images = images[..., ::-1]  # BGR -> RGB
            labels = None
            for key in ("labels", "label_specific"):
                if key in archive.files:
                    labels = np.asarray(archive[key]).reshape(-1)
                    break
    except NPZ_READ_ERRORS as error:
        raise TnasError(f"{path}: not a readable .npz file ({type(error).__name__}: {error})") from None
    return images, labels


def _tiered_names(distinct: List[Any], names: Optional[List[str]]) -> List[str]:
    result = []
    for value in distinct:
        if names is not None and np.issubdtype(np.asarray(value).dtype, np.integer) and 0 <= int(value) < len(names):
            result.append(names[int(value)])
        else:
            result.append(_text(value) if not np.issubdtype(np.asarray(value).dtype, np.integer) else f"class{int(value)}")
    return result


# ----------------------------------------------------------------------------- user folders

FOLDER_LAYOUT = "{train,val,test}/<class>/*.png|jpg|jpeg"


def find_folder(root: Optional[str], split: str, options: Dict[str, Any]) -> SplitSource:
    root = _require_root("folder", root, FOLDER_LAYOUT)
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise TnasError(f"folder: {split_dir} does not exist; expected {root}/{FOLDER_LAYOUT}")
    paths, labels, classes, fingerprint = scan_class_folders(split_dir, "folder")
    return SplitSource(fingerprint, split_dir, lambda: RawSplit(labels, classes, split_dir, paths=paths))
