"""The embedded glyphs demo dataset (tnas.data.glyphs)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from tnas.data import EpisodeSampler, load_split
from tnas.data import glyphs


@pytest.fixture(scope="module")
def glyph_splits(tmp_path_factory):
    cache = tmp_path_factory.mktemp("glyph-cache")
    started = time.perf_counter()
    splits = {name: load_split("glyphs", name, cache_dir=str(cache)) for name in ("train", "val", "test")}
    return splits, time.perf_counter() - started, cache


def test_generation_time_and_shape(glyph_splits):
    splits, seconds, _ = glyph_splits
    assert seconds < 60, f"generating glyphs took {seconds:.1f} s"
    for split in splits.values():
        assert split.images.shape[1:] == (28, 28, 1) and split.images.dtype == np.uint8
        assert (split.class_counts() == 20).all()
        assert split.labels.min() == 0 and split.labels.max() == split.num_classes - 1
        assert np.asarray(split.images).reshape(len(split), -1).max(axis=1).min() > 100  # every image has ink


def test_class_counts_and_disjoint_splits(glyph_splits):
    splits, _, _ = glyph_splits
    total = sum(s.num_classes for s in splits.values())
    assert total == len(glyphs.glyph_classes()) >= 200
    assert splits["train"].num_classes == round(0.6 * total)
    assert abs(splits["val"].num_classes - splits["test"].num_classes) <= 1
    names = [set(s.class_names) for s in splits.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert all(len(n) == s.num_classes for n, s in zip(names, splits.values()))
    assert "U+0041 LATIN CAPITAL LETTER A" in set.union(*names)


def test_deterministic_bytes(glyph_splits, tmp_path):
    splits, _, _ = glyph_splits
    serial = load_split("glyphs", "train", cache_dir=str(tmp_path / "other"), num_workers=1)
    assert np.array_equal(np.asarray(serial.images), np.asarray(splits["train"].images))  # fixture: 2 workers
    assert serial.class_names == splits["train"].class_names
    small = load_split("glyphs", "val", cache_dir=str(tmp_path / "other"), images_per_class=3)
    reseeded = load_split("glyphs", "val", cache_dir=str(tmp_path / "other"), images_per_class=3, seed=1)
    assert reseeded.class_names == small.class_names == splits["val"].class_names
    assert not np.array_equal(np.asarray(reseeded.images), np.asarray(small.images))
    assert reseeded.cache_path != small.cache_path


def test_render_class_options():
    classes = glyphs.glyph_classes()
    for char, fonts in classes:
        assert len(fonts) >= 2
    rgb = glyphs.render_class((0, 3, 84, 3, 0))
    assert rgb.shape == (3, 84, 84, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb, glyphs.render_class((0, 3, 84, 3, 0)))


def test_images_per_class_option(tmp_path):
    split = load_split("glyphs", "test", cache_dir=str(tmp_path), images_per_class=4, img_size=16)
    assert (split.class_counts() == 4).all() and split.images.shape[1:] == (16, 16, 1)
    with pytest.raises(Exception, match="images_per_class"):
        load_split("glyphs", "test", cache_dir=str(tmp_path), images_per_class=1)


def test_sampler_on_glyphs(glyph_splits):
    splits, _, _ = glyph_splits
    batch = EpisodeSampler(splits["train"], 5, 1, 15, 4, seed=0).sample()
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 75, 1, 28, 28)
    assert abs(float(batch.query_x.mean())) < 0.5 and 0.5 < float(batch.query_x.std()) < 1.5


def test_glyphs_learnable_by_nearest_neighbour(glyph_splits):
    """A sanity check that the demo task is learnable: 1-NN in pixel space beats chance by far."""
    splits, _, _ = glyph_splits
    sampler = EpisodeSampler(splits["test"], 5, 1, 15, 50, seed=0)
    batch = sampler.sample()
    support = batch.support_x.flatten(2)
    query = batch.query_x.flatten(2)
    distances = ((query[:, :, None, :] - support[:, None, :, :]) ** 2).sum(-1)
    predicted = batch.support_y.gather(1, distances.argmin(-1))
    accuracy = float((predicted == batch.query_y).float().mean())
    assert accuracy > 0.3  # chance is 0.2
