"""Tiny on-disk datasets in every format `tnas.data` reads, for the data tests.

Each builder writes into a directory it is given and returns a dict describing what it wrote
(class counts per split, images per class), so tests can check the readers against it.
Images are small random pictures of assorted sizes and modes, so resizing and colour
conversion are exercised too.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

MINI_CLASSES = {"train": 6, "val": 5, "test": 5}
MINI_PER_CLASS = 4

# CIFAR-100 superclasses and their fine classes (public facts of the dataset).
CIFAR_SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def random_image(rng: np.random.Generator, size=(12, 10), mode: str = "RGB") -> Image.Image:
    width, height = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def write_image(path: str, rng: np.random.Generator, size=(12, 10), mode: str = "RGB") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = random_image(rng, size, mode)
    if path.lower().endswith((".jpg", ".jpeg")) and image.mode == "RGBA":
        image = image.convert("RGB")
    image.save(path)


def wnid(split: str, index: int) -> str:
    return f"n{ {'train': 1, 'val': 2, 'test': 3}[split] }{index:07d}"


def build_mini_csv(root: str, seed: int = 0) -> Dict[str, int]:
    """images/*.jpg + train.csv/val.csv/test.csv (header filename,label)."""
    rng = np.random.default_rng(seed)
    for split, classes in MINI_CLASSES.items():
        lines = ["filename,label"]
        for c in range(classes):
            for i in range(MINI_PER_CLASS):
                name = f"{wnid(split, c)}{i:08d}.jpg"
                write_image(os.path.join(root, "images", name), rng, size=(12 + c, 10))
                lines.append(f"{name},{wnid(split, c)}")
        with open(os.path.join(root, f"{split}.csv"), "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return dict(MINI_CLASSES)


def build_class_folders(root: str, classes: Dict[str, int], per_class: int = MINI_PER_CLASS, seed: int = 0,
                        mixed: bool = False) -> Dict[str, int]:
    """root/{split}/<class>/*.jpg (or mixed png/jpg/jpeg, sizes and modes when ``mixed``)."""
    rng = np.random.default_rng(seed)
    modes = ["RGB", "L", "RGBA"]
    extensions = [".jpg", ".png", ".jpeg", ".PNG"]
    for split, count in classes.items():
        for c in range(count):
            for i in range(per_class):
                if mixed:
                    ext = extensions[(c + i) % len(extensions)]
                    mode = modes[(c * 3 + i) % len(modes)]
                    size = (8 + 5 * i, 9 + 3 * c)
                else:
                    ext, mode, size = ".jpg", "RGB", (12, 10)
                write_image(os.path.join(root, split, wnid(split, c), f"img{i:03d}{ext}"), rng, size, mode)
    return dict(classes)


def build_mini_pickles(root: str, validation_name: bool = True, seed: int = 0, img_size: int = 84) -> Dict[str, int]:
    """mini-imagenet-cache-{train,val|validation,test}.pkl with image_data and class_dict."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, classes in MINI_CLASSES.items():
        count = classes * MINI_PER_CLASS
        images = rng.integers(0, 256, size=(count, img_size, img_size, 3), dtype=np.uint8)
        order = rng.permutation(count)  # classes interleaved in the array, as in real files
        class_dict = {wnid(split, c): sorted(order[c * MINI_PER_CLASS:(c + 1) * MINI_PER_CLASS].tolist())
                      for c in range(classes)}
        name = "validation" if (split == "val" and validation_name) else split
        with open(os.path.join(root, f"mini-imagenet-cache-{name}.pkl"), "wb") as handle:
            pickle.dump({"image_data": images, "class_dict": class_dict}, handle, protocol=4)
    return dict(MINI_CLASSES)


def build_omniglot(root: str, seed: int = 0, per_character: int = 3) -> List[str]:
    """images_background/ (2 alphabets x 5 characters) and images_evaluation/ (2 x 4), 105x105 PNGs.

    Returns all character names 'Alphabet/characterNN' in the order that defines the split.
    """
    rng = np.random.default_rng(seed)
    layout = {"images_background": {"Alpha": 5, "Beta": 5}, "images_evaluation": {"Gamma": 4, "Delta": 4}}
    names = []
    for subset, alphabets in layout.items():
        for alphabet in sorted(alphabets):
            for c in range(1, alphabets[alphabet] + 1):
                character = f"character{c:02d}"
                names.append(f"{alphabet}/{character}")
                for i in range(per_character):
                    strokes = (rng.random((105, 105)) > 0.2).astype(np.uint8) * 255
                    path = os.path.join(root, subset, alphabet, character, f"{c:04d}_{i + 1:02d}.png")
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    Image.fromarray(strokes, "L").convert("1").save(path)
    return names


def build_cifar100(root: str, seed: int = 0, train_per_class: int = 2, test_per_class: int = 1) -> None:
    """cifar-100-python/{train,test,meta} with the real class names, Python-2 style bytes keys."""
    rng = np.random.default_rng(seed)
    coarse_names = sorted(CIFAR_SUPERCLASSES)
    fine_names = sorted(n for names in CIFAR_SUPERCLASSES.values() for n in names)
    coarse_of = {fine: coarse_names.index(coarse) for coarse, fines in CIFAR_SUPERCLASSES.items() for fine in fines}
    directory = os.path.join(root, "cifar-100-python")
    os.makedirs(directory, exist_ok=True)
    meta = {b"fine_label_names": [n.encode() for n in fine_names],
            b"coarse_label_names": [n.encode() for n in coarse_names]}
    with open(os.path.join(directory, "meta"), "wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        data = rng.integers(0, 256, size=(fine.size, 3072), dtype=np.uint8)
        payload = {b"filenames": [f"img{i}.png".encode() for i in range(fine.size)], b"batch_label": part.encode(),
                   b"fine_labels": fine.tolist(), b"coarse_labels": [coarse_of[fine_names[f]] for f in fine],
                   b"data": data}
        with open(os.path.join(directory, part), "wb") as handle:
            pickle.dump(payload, handle, protocol=2)


TIERED_CLASSES = {"train": 6, "val": 5, "test": 5}
TIERED_PER_CLASS = 4


def build_tiered(root: str, variant: str = "png", seed: int = 0) -> Dict[str, int]:
    """{split}_images_png.pkl (list of PNG bytes as uint8 arrays) or {split}_images.npz, + {split}_labels.pkl."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for split, classes in TIERED_CLASSES.items():
        count = classes * TIERED_PER_CLASS
        fine = np.repeat(np.arange(classes) * 3 + 7, TIERED_PER_CLASS)  # arbitrary ids, not 0..C-1
        rng.shuffle(fine)
        names = [f"n{split}{i:05d}" for i in range(classes * 3 + 7)]
        labels = {"label_specific": fine, "label_general": fine // 10, "label_specific_str": names,
                  "label_general_str": ["g"] * 10}
        with open(os.path.join(root, f"{split}_labels.pkl"), "wb") as handle:
            pickle.dump(labels, handle, protocol=2)
        images = rng.integers(0, 256, size=(count, 84, 84, 3), dtype=np.uint8)
        if variant == "npz":  # written as the release's conversion writes it: decoded by OpenCV, so BGR
            np.savez(os.path.join(root, f"{split}_images.npz"), images=images[..., ::-1])
        else:
            encoded = []
            for image in images:
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                encoded.append(np.frombuffer(buffer.getvalue(), dtype=np.uint8))
            with open(os.path.join(root, f"{split}_images_png.pkl"), "wb") as handle:
                pickle.dump(encoded, handle, protocol=2)
    return dict(TIERED_CLASSES)


def class_sets(splits: Sequence) -> List[set]:
    return [set(split.class_names) for split in splits]
