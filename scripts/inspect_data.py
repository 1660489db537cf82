#!/usr/bin/env python
"""Check a dataset before a long run: decode it into the cache, print per-split statistics as
JSON, and draw one episode as a PNG grid.

    python scripts/inspect_data.py --dataset miniimagenet --data_path ~/data/miniImagenet
    python scripts/inspect_data.py --dataset glyphs --out /tmp/glyphs

The JSON has, per split, the number of classes and images, the image shape (C, H, W), the
smallest and largest class, and the cache entry; plus the normalisation mean/std and whether
any class name appears in two splits. A split that cannot be read is reported with its error
and the script exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict, List, Optional

import numpy as np

from tnas.data import DATASETS, SPLITS, ImageSplit, load_split, sample_episode_indices
from tnas.config import HelpFormatter, parse_flags
from tnas.errors import TnasError, cli_entry


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    parser.add_argument("--data_path", default=None, metavar="DIR", help="dataset root directory (not needed for glyphs)")
    parser.add_argument("--img_size", type=int, default=None, help="image side in pixels (default: the dataset's)")
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="image channels: 1 grayscale, 3 RGB (default: the dataset's)")
    parser.add_argument("--cache_dir", default=None, metavar="DIR",
                        help="cache directory (default: $TNAS_CACHE_DIR, else ~/.cache/tnas)")
    parser.add_argument("--out", default=".", metavar="DIR", help="directory for the episode grid PNG")
    parser.add_argument("--split", default="train", choices=SPLITS, help="split to draw the episode from")
    parser.add_argument("--n_way", type=int, default=5, help="classes of the episode drawn (rows of the grid)")
    parser.add_argument("--k_shot", type=int, default=1, help="support images per class shown in the grid")
    parser.add_argument("--q_query", type=int, default=5, help="query images per class shown in the grid")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the episode drawn")
    parser.add_argument("--num_workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option, e.g. rotations=true (omniglot), images_per_class=30 (glyphs); "
                             "repeat the flag for several")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The flags; a bad or unknown one is a one-line error (:func:`tnas.config.parse_flags`)."""
    return parse_flags(build_parser(), argv)


def parse_options(pairs: List[str]) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise TnasError(f"--option {pair!r} should look like KEY=VALUE")
        key, value = (part.strip() for part in pair.split("=", 1))
        lowered = value.lower()
        if lowered in ("true", "yes", "false", "no"):
            options[key] = lowered in ("true", "yes")
        else:
            try:
                options[key] = int(value)
            except ValueError:
                options[key] = value
    return options


def describe(split: ImageSplit) -> Dict[str, Any]:
    counts = split.class_counts()
    smallest, largest = int(np.argmin(counts)), int(np.argmax(counts))
    return {"classes": split.num_classes, "images": len(split), "image_shape": list(split.image_shape),
            "min_class_size": int(counts[smallest]), "min_class": split.class_names[smallest],
            "max_class_size": int(counts[largest]), "cache": split.cache_path}


def episode_grid(split: ImageSplit, n_way: int, k_shot: int, q_query: int, seed: int, path: str) -> Dict[str, Any]:
    """One episode as a grid: a row per class, support images, a gap, then query images."""
    from PIL import Image

    counts = split.class_counts()
    n_way = max(1, min(n_way, split.num_classes))
    per_class = max(1, min(k_shot + q_query, int(counts.min())))
    k_shot = min(k_shot, per_class)
    indices = sample_episode_indices(split, np.random.default_rng(seed), 1, n_way, per_class)[0]
    _, height, width = split.image_shape
    cell = max(56, height)
    gap = 4
    columns = per_class + (1 if per_class > k_shot else 0)
    grid = Image.new("RGB", (columns * (cell + gap) + gap, n_way * (cell + gap) + gap), (40, 40, 40))
    for row in range(n_way):
        column = 0
        for position in range(per_class):
            if position == k_shot:
                column += 1  # blank column between support and query
            image = np.asarray(split.images[indices[row, position]])
            tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
            tile = tile.resize((cell, cell), Image.Resampling.NEAREST if height < cell else Image.Resampling.BILINEAR)
            grid.paste(tile, (gap + column * (cell + gap), gap + row * (cell + gap)))
            column += 1
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return {"path": path, "split": split.name, "n_way": n_way, "k_shot": k_shot, "q_query": per_class - k_shot,
            "classes": [split.class_names[int(split.labels[indices[r, 0]])] for r in range(n_way)]}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    options = parse_options(args.option)
    if args.num_workers is not None:
        options["num_workers"] = args.num_workers
    report: Dict[str, Any] = {"dataset": args.dataset, "data_path": args.data_path, "splits": {}}
    loaded: Dict[str, ImageSplit] = {}
    errors: List[str] = []
    for name in SPLITS:
        try:
            split = load_split(args.dataset, name, data_path=args.data_path, img_size=args.img_size,
                               channels=args.channels, cache_dir=args.cache_dir, **dict(options))
        except TnasError as error:
            if name == SPLITS[0] and ("unknown dataset" in str(error) or "needs --data_path" in str(error)
                                     or "has no option" in str(error) or "--img_size" in str(error)):
                raise
            report["splits"][name] = {"error": str(error)}
            errors.append(str(error))
            continue
        loaded[name] = split
        report["splits"][name] = describe(split)
    if not loaded:
        raise TnasError(errors[0])
    if loaded:
        first = next(iter(loaded.values()))
        report["image_shape"] = list(first.image_shape)
        notes = [getattr(split, "shape_note", None) for split in loaded.values()]
        given = "given by --img_size / --channels" if args.img_size or args.channels else \
            f"the default of dataset '{args.dataset}'"
        report["image_shape_chosen_because"] = next((note for note in notes if note), given)
        report["mean"] = [round(v, 4) for v in first.mean]
        report["std"] = [round(v, 4) for v in first.std]
        names = {k: set(v.class_names) for k, v in loaded.items()}
        keys = list(names)
        report["classes_shared_between_splits"] = sum(len(names[a] & names[b]) for i, a in enumerate(keys)
                                                      for b in keys[i + 1:])
    if args.split in loaded:
        dataset_name = loaded[args.split].name.split("/")[0]
        path = os.path.join(args.out, f"episode_{dataset_name}_{args.split}.png")
        report["episode_grid"] = episode_grid(loaded[args.split], args.n_way, args.k_shot, args.q_query, args.seed, path)
    print(json.dumps(report, indent=2))
    if errors:
        raise TnasError(errors[0])
    return 0


if __name__ == "__main__":
    cli_entry(main)
