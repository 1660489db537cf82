"""Readers for every on-disk format, the uint8 cache, and the one-line errors (tnas.data)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from tnas.data import DATASETS, load_split
from tnas.data import decode as decode_module
from tnas.data.formats import omniglot_split_sizes
from tnas.errors import TnasError

try:
    import data_fixtures as fx
except ImportError:  # tests/ imported as a package
    from tests import data_fixtures as fx


def load_all(dataset, root, cache, **kwargs):
    return [load_split(dataset, split, data_path=str(root) if root else None, cache_dir=str(cache), **kwargs)
            for split in ("train", "val", "test")]


def check_splits(splits, classes, per_class, shape):
    for split, (name, count) in zip(splits, classes.items()):
        assert split.name.endswith("/" + name)
        assert split.num_classes == count
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == shape
        assert split.image_shape == (shape[2], shape[0], shape[1])
        assert split.labels.dtype == np.int64
        assert split.labels.min() == 0 and split.labels.max() == count - 1
        assert (split.class_counts() == per_class).all()
        assert len(split.mean) == shape[2] and len(split.std) == shape[2]
    sets = fx.class_sets(splits)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # normalisation statistics come from the train split
    assert splits[1].mean == splits[0].mean and splits[2].std == splits[0].std


# ----------------------------------------------------------------------------- mini-ImageNet


def test_mini_csv_layout(tmp_path):
    fx.build_mini_csv(tmp_path / "mini")
    splits = load_all("miniimagenet", tmp_path / "mini", tmp_path / "cache")
    check_splits(splits, fx.MINI_CLASSES, fx.MINI_PER_CLASS, (84, 84, 3))
    assert splits[0].class_names[0] == fx.wnid("train", 0)
    assert isinstance(splits[0].images, np.memmap)


def test_mini_class_folders_and_img_size(tmp_path):
    fx.build_class_folders(tmp_path / "mini", fx.MINI_CLASSES)
    splits = load_all("miniimagenet", tmp_path / "mini", tmp_path / "cache", img_size=32, channels=1)
    check_splits(splits, fx.MINI_CLASSES, fx.MINI_PER_CLASS, (32, 32, 1))


@pytest.mark.parametrize("validation_name", [True, False])
def test_mini_pickles(tmp_path, validation_name):
    fx.build_mini_pickles(tmp_path / "mini", validation_name=validation_name)
    splits = load_all("miniimagenet", tmp_path / "mini", tmp_path / "cache")
    check_splits(splits, fx.MINI_CLASSES, fx.MINI_PER_CLASS, (84, 84, 3))
    # images land under the right class: compare with the pickle
    name = "validation" if validation_name else "val"
    with open(tmp_path / "mini" / f"mini-imagenet-cache-{name}.pkl", "rb") as handle:
        raw = pickle.load(handle)
    val = splits[1]
    for label, wnid in enumerate(val.class_names):
        ours = val.images[val.labels == label]
        theirs = raw["image_data"][raw["class_dict"][wnid]]
        assert np.array_equal(ours, theirs)


def test_mini_pickle_resized(tmp_path):
    fx.build_mini_pickles(tmp_path / "mini", img_size=40)
    split = load_split("miniimagenet", "test", data_path=str(tmp_path / "mini"), cache_dir=str(tmp_path / "c"))
    assert split.images.shape[1:] == (84, 84, 3)


def test_mini_pickle_unexpected_keys(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as handle:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8), "labels": [0, 1]}, handle)
    with pytest.raises(TnasError) as info:
        load_split("miniimagenet", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert "images" in message and "labels" in message and "image_data" in message and "\n" not in message


def test_mini_csv_bad_header_and_missing_image(tmp_path):
    root = tmp_path / "mini"
    fx.build_mini_csv(root)
    (root / "train.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(TnasError, match="filename,label"):
        load_split("miniimagenet", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))
    (root / "train.csv").write_text("filename,label\nmissing.jpg,n1\n")
    with pytest.raises(TnasError, match="missing.jpg"):
        load_split("miniimagenet", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))


def test_missing_root_and_missing_files(tmp_path):
    with pytest.raises(TnasError) as info:
        load_split("miniimagenet", "train", data_path=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c"))
    assert "nowhere" in str(info.value) and "train.csv" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TnasError) as info:
        load_split("miniimagenet", "val", data_path=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert "val.csv" in message and "mini-imagenet-cache-val.pkl" in message and "val/<wnid>" in message
    with pytest.raises(TnasError, match="needs --data_path"):
        load_split("miniimagenet", "train", cache_dir=str(tmp_path / "c"))
    for name in ("omniglot", "tieredimagenet", "cifar_fs", "folder"):
        with pytest.raises(TnasError) as info:
            load_split(name, "train", data_path=str(tmp_path / "empty"), cache_dir=str(tmp_path / "c"))
        assert str(tmp_path / "empty") in str(info.value)


def test_unknown_dataset_option_split(tmp_path):
    with pytest.raises(TnasError) as info:
        load_split("imagenet21k", "train", cache_dir=str(tmp_path))
    for name in DATASETS:
        assert name in str(info.value)
    with pytest.raises(TnasError, match="rotations"):
        load_split("folder", "train", data_path=str(tmp_path), rotations=True)
    with pytest.raises(TnasError, match="unknown split"):
        load_split("glyphs", "holdout")
    with pytest.raises(TnasError, match="--channels"):
        load_split("glyphs", "train", channels=2)
    with pytest.raises(TnasError, match="--img_size"):
        load_split("glyphs", "train", img_size=0)


# ----------------------------------------------------------------------------- Omniglot


def test_omniglot_split_rule():
    assert omniglot_split_sizes(1623) == (1100, 100, 423)
    assert sum(omniglot_split_sizes(18)) == 18
    train, val, test = omniglot_split_sizes(18)
    assert train >= 1 and val >= 1 and test >= 1


def test_omniglot(tmp_path):
    names = fx.build_omniglot(tmp_path / "omniglot")
    splits = load_all("omniglot", tmp_path / "omniglot", tmp_path / "cache")
    n_train, n_val, n_test = omniglot_split_sizes(len(names))
    check_splits(splits, {"train": n_train, "val": n_val, "test": n_test}, 3, (28, 28, 1))
    # the documented order: background alphabets then evaluation alphabets, sorted by name
    assert splits[0].class_names == names[:n_train]
    assert splits[2].class_names == names[n_train + n_val:]
    rotated = load_split("omniglot", "train", data_path=str(tmp_path / "omniglot"), cache_dir=str(tmp_path / "cache"),
                         rotations=True)
    assert rotated.num_classes == 4 * n_train and (rotated.class_counts() == 3).all()
    first = rotated.images[rotated.labels == 0]
    turned = rotated.images[rotated.labels == 1]
    assert np.array_equal(np.rot90(first, k=1, axes=(1, 2)), turned)
    assert rotated.class_names[1].endswith("/rot090")


def test_omniglot_torchvision_layout(tmp_path):
    fx.build_omniglot(tmp_path / "data" / "omniglot-py")
    split = load_split("omniglot", "test", data_path=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert split.num_classes == omniglot_split_sizes(18)[2]


# ----------------------------------------------------------------------------- CIFAR-FS, FC100


def test_cifar_fs_and_fc100(tmp_path):
    fx.build_cifar100(tmp_path / "cifar")
    cifar_fs = load_all("cifar_fs", tmp_path / "cifar", tmp_path / "cache")
    check_splits(cifar_fs, {"train": 64, "val": 16, "test": 20}, 3, (32, 32, 3))
    assert "baby" in cifar_fs[2].class_names and "otter" in cifar_fs[1].class_names
    fc100 = load_all("fc100", tmp_path / "cifar", tmp_path / "cache")
    check_splits(fc100, {"train": 60, "val": 20, "test": 20}, 3, (32, 32, 3))
    assert set(fc100[2].class_names) == set(fx.CIFAR_SUPERCLASSES["aquatic_mammals"] + fx.CIFAR_SUPERCLASSES["insects"]
                                            + fx.CIFAR_SUPERCLASSES["medium_mammals"] + fx.CIFAR_SUPERCLASSES["people"])
    # pixels: the first test image of class 'baby' equals the pickle's, in HWC order
    with open(tmp_path / "cifar" / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    fine = np.asarray(raw[b"fine_labels"])
    baby = sorted(n for names in fx.CIFAR_SUPERCLASSES.values() for n in names).index("baby")
    expected = raw[b"data"][np.flatnonzero(fine == baby)[0]].reshape(3, 32, 32).transpose(1, 2, 0)
    test = cifar_fs[2]
    assert np.array_equal(test.images[test.labels == test.class_names.index("baby")][0], expected)


def test_cifar_unexpected_keys(tmp_path):
    fx.build_cifar100(tmp_path / "cifar")
    with open(tmp_path / "cifar" / "cifar-100-python" / "test", "wb") as handle:
        pickle.dump({b"pixels": np.zeros((1, 3072), np.uint8), b"labels": [0]}, handle, protocol=2)
    with pytest.raises(TnasError) as info:
        load_split("fc100", "train", data_path=str(tmp_path / "cifar"), cache_dir=str(tmp_path / "c"))
    assert "pixels" in str(info.value) and "fine_labels" in str(info.value)


def test_unsafe_pickle_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    root = tmp_path / "mini"
    root.mkdir()
    with open(root / "mini-imagenet-cache-train.pkl", "wb") as handle:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, handle)
    with pytest.raises(TnasError, match="system"):
        load_split("miniimagenet", "train", data_path=str(root), cache_dir=str(tmp_path / "c"))


def _rewrite_pickle(path, change):
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    with open(path, "wb") as handle:
        pickle.dump(change(data), handle)


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _as_npy(path):
    with open(path, "wb") as handle:
        np.save(handle, np.zeros((2, 84, 84, 3), np.uint8))


# (dataset, builder, the file spoilt, how), each a file someone might send that once gave a traceback
_SPOILT = {
    "mini_class_dict_not_indices": ("miniimagenet", fx.build_mini_pickles, "mini-imagenet-cache-train.pkl",
                                    lambda p: _rewrite_pickle(p, lambda d: dict(d, class_dict={"n1": ["a", "b"]}))),
    "mini_images_of_7_channels": ("miniimagenet", fx.build_mini_pickles, "mini-imagenet-cache-train.pkl",
                                  lambda p: _rewrite_pickle(p, lambda d: dict(d, image_data=np.zeros(
                                      d["image_data"].shape[:3] + (7,), np.uint8)))),
    "mini_images_of_no_pixels": ("miniimagenet", fx.build_mini_pickles, "mini-imagenet-cache-train.pkl",
                                 lambda p: _rewrite_pickle(p, lambda d: dict(d, image_data=np.zeros(
                                     (len(d["image_data"]), 0, 0, 3), np.uint8)))),
    "mini_csv_not_utf8": ("miniimagenet", fx.build_mini_csv, "train.csv",
                          lambda p: p.write_bytes(p.read_bytes() + b"\xff\xfe.jpg,n1\n")),
    "cifar_names_not_a_list": ("cifar_fs", fx.build_cifar100, "cifar-100-python/meta",
                               lambda p: _rewrite_pickle(p, lambda d: dict(d, fine_label_names=5))),
    "tiered_png_not_a_list": ("tieredimagenet", lambda r: fx.build_tiered(r, variant="png"), "train_images_png.pkl",
                              lambda p: _rewrite_pickle(p, lambda d: 5)),
    "tiered_names_not_a_list": ("tieredimagenet", lambda r: fx.build_tiered(r, variant="png"), "train_labels.pkl",
                                lambda p: _rewrite_pickle(p, lambda d: dict(d, label_specific_str=7))),
    "tiered_npz_truncated": ("tieredimagenet", lambda r: fx.build_tiered(r, variant="npz"), "train_images.npz",
                             lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2])),
    "tiered_npz_bad_crc": ("tieredimagenet", lambda r: fx.build_tiered(r, variant="npz"), "train_images.npz",
                           _flip_middle_byte),
    "tiered_npz_object_array": ("tieredimagenet", lambda r: fx.build_tiered(r, variant="npz"), "train_images.npz",
                                lambda p: np.savez(p, images=np.array([None, 1], dtype=object))),
    "tiered_npz_is_an_npy": ("tieredimagenet", lambda r: fx.build_tiered(r, variant="npz"), "train_images.npz",
                             _as_npy),
}


@pytest.mark.parametrize("case", sorted(_SPOILT))
def test_a_spoilt_dataset_file_is_one_line_naming_it(tmp_path, case):
    """A dataset file that is damaged, or holds the expected keys with values of the wrong type: one
    TnasError line naming the file, not a traceback from numpy, zipfile or the csv reader."""
    dataset, build, name, spoil = _SPOILT[case]
    root = tmp_path / "data"
    build(str(root))
    spoil(root / name)
    with pytest.raises(TnasError) as info:
        load_split(dataset, "train", data_path=str(root), cache_dir=str(tmp_path / "c"))
    message = str(info.value)
    assert str(root / name) in message and "\n" not in message


# ----------------------------------------------------------------------------- tieredImageNet


@pytest.mark.parametrize("variant", ["png", "npz"])
def test_tiered(tmp_path, variant):
    fx.build_tiered(tmp_path / "tiered", variant=variant)
    splits = load_all("tieredimagenet", tmp_path / "tiered", tmp_path / "cache")
    check_splits(splits, fx.TIERED_CLASSES, fx.TIERED_PER_CLASS, (84, 84, 3))
    assert splits[0].class_names[0] == "ntrain00007"


@pytest.mark.parametrize("img_size", [None, 42])
def test_tiered_pngs_match_npz(tmp_path, img_size):
    """The same images from both layouts, the npz written BGR as the release's conversion writes it;
    at 84 px (a copy) and resized (image by image)."""
    fx.build_tiered(tmp_path / "a", variant="png", seed=3)
    fx.build_tiered(tmp_path / "b", variant="npz", seed=3)
    a, b = (load_split("tieredimagenet", "val", data_path=str(tmp_path / name), cache_dir=str(tmp_path / "c"),
                       img_size=img_size, normalize="imagenet") for name in ("a", "b"))
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.images.shape[1:3] == ((img_size, img_size) if img_size else (84, 84))


def test_tiered_labels_unexpected_keys(tmp_path):
    fx.build_tiered(tmp_path / "tiered", variant="npz")
    with open(tmp_path / "tiered" / "train_labels.pkl", "wb") as handle:
        pickle.dump({"fine": [0], "coarse": [0]}, handle)
    with pytest.raises(TnasError) as info:
        load_split("tieredimagenet", "train", data_path=str(tmp_path / "tiered"), cache_dir=str(tmp_path / "c"))
    assert "coarse" in str(info.value) and "fine" in str(info.value) and "label_specific" in str(info.value)


def test_tiered_npz_unexpected_keys(tmp_path):
    fx.build_tiered(tmp_path / "tiered", variant="npz")
    np.savez(tmp_path / "tiered" / "test_images.npz", pictures=np.zeros((1, 84, 84, 3), np.uint8))
    with pytest.raises(TnasError, match="pictures"):
        load_split("tieredimagenet", "test", data_path=str(tmp_path / "tiered"), cache_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- folder


def test_folder_mixed_images(tmp_path):
    classes = {"train": 4, "val": 3, "test": 3}
    fx.build_class_folders(tmp_path / "mine", classes, per_class=5, mixed=True)
    (tmp_path / "mine" / "train" / fx.wnid("train", 0) / "notes.txt").write_text("not an image")
    rgb = load_all("folder", tmp_path / "mine", tmp_path / "cache", img_size=20)
    check_splits(rgb, classes, 5, (20, 20, 3))
    gray = load_all("folder", tmp_path / "mine", tmp_path / "cache", img_size=16, channels=1)
    check_splits(gray, classes, 5, (16, 16, 1))


def test_corrupt_image_named(tmp_path, monkeypatch):
    fx.build_class_folders(tmp_path / "mine", {"train": 3}, per_class=4)
    bad = tmp_path / "mine" / "train" / fx.wnid("train", 1) / "img002.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(TnasError) as info:
        load_split("folder", "train", data_path=str(tmp_path / "mine"), cache_dir=str(tmp_path / "c"))
    assert str(bad) in str(info.value) and "\n" not in str(info.value)
    # the same through the process pool
    monkeypatch.setattr(decode_module, "_PARALLEL_MIN_ITEMS", 1)
    monkeypatch.setattr(decode_module, "_CHUNK", 2)
    with pytest.raises(TnasError, match="img002.jpg"):
        load_split("folder", "train", data_path=str(tmp_path / "mine"), cache_dir=str(tmp_path / "c"), num_workers=2)
    # no half-written entry is left behind
    leftovers = [p for p in (tmp_path / "c").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_empty_class_folder(tmp_path):
    fx.build_class_folders(tmp_path / "mine", {"train": 2}, per_class=2)
    (tmp_path / "mine" / "train" / "zzz_empty").mkdir()
    with pytest.raises(TnasError, match="zzz_empty"):
        load_split("folder", "train", data_path=str(tmp_path / "mine"), cache_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- cache


def test_parallel_decode_matches_serial(tmp_path, monkeypatch):
    fx.build_class_folders(tmp_path / "mine", {"train": 4}, per_class=6, mixed=True)
    serial = load_split("folder", "train", data_path=str(tmp_path / "mine"), cache_dir=str(tmp_path / "a"), num_workers=1)
    monkeypatch.setattr(decode_module, "_PARALLEL_MIN_ITEMS", 1)
    monkeypatch.setattr(decode_module, "_CHUNK", 5)
    parallel = load_split("folder", "train", data_path=str(tmp_path / "mine"), cache_dir=str(tmp_path / "b"),
                          num_workers=2)
    assert np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))
    assert np.array_equal(serial.labels, parallel.labels)


def test_cache_reuse_staleness_and_env(tmp_path, monkeypatch):
    root = tmp_path / "mine"
    fx.build_class_folders(root, {"train": 3}, per_class=4)
    monkeypatch.setenv("TNAS_CACHE_DIR", str(tmp_path / "envcache"))
    first = load_split("folder", "train", data_path=str(root))
    assert first.cache_path.startswith(str(tmp_path / "envcache"))
    meta_path = os.path.join(first.cache_path, "meta.json")
    stamp = os.stat(meta_path).st_mtime_ns
    again = load_split("folder", "train", data_path=str(root))
    assert again.cache_path == first.cache_path and os.stat(meta_path).st_mtime_ns == stamp  # not rebuilt
    # a new image makes the entry stale: it is rebuilt in place
    fx.write_image(str(root / "train" / fx.wnid("train", 0) / "img999.png"), np.random.default_rng(1))
    grown = load_split("folder", "train", data_path=str(root))
    assert grown.cache_path == first.cache_path and len(grown) == len(first) + 1
    # the raw files gone: the cache still serves
    import shutil
    shutil.rmtree(root)
    served = load_split("folder", "train", data_path=str(root))
    assert len(served) == len(grown)
    with open(os.path.join(served.cache_path, "meta.json")) as handle:
        meta = json.load(handle)
    assert meta["num_images"] == len(served) and len(meta["class_names"]) == 3


def test_cache_key_includes_data_path(tmp_path):
    fx.build_class_folders(tmp_path / "one", {"train": 2}, per_class=3, seed=1)
    fx.build_class_folders(tmp_path / "two", {"train": 2}, per_class=3, seed=2)
    a = load_split("folder", "train", data_path=str(tmp_path / "one"), cache_dir=str(tmp_path / "c"))
    b = load_split("folder", "train", data_path=str(tmp_path / "two"), cache_dir=str(tmp_path / "c"))
    assert a.cache_path != b.cache_path
    assert not np.array_equal(np.asarray(a.images), np.asarray(b.images))
    c = load_split("folder", "train", data_path=str(tmp_path / "one"), cache_dir=str(tmp_path / "c"), img_size=24)
    assert c.cache_path != a.cache_path


def _build_in_child(args):
    root, cache = args
    split = load_split("folder", "train", data_path=root, cache_dir=cache)
    return split.cache_path, int(np.asarray(split.images, dtype=np.int64).sum())


def test_concurrent_builders_agree(tmp_path):
    import multiprocessing

    fx.build_class_folders(tmp_path / "mine", {"train": 4}, per_class=5)
    args = (str(tmp_path / "mine"), str(tmp_path / "cache"))
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_build_in_child, [args] * 3)
    assert len({r for r in results}) == 1
    entries = [e for e in os.listdir(tmp_path / "cache" / "folder") if not e.endswith(".lock")]
    assert len(entries) == 1 and ".tmp-" not in entries[0]
