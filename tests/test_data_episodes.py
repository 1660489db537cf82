"""EpisodeSampler, FixedEpisodes, EpisodeBatch and split helpers (tnas.data)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tnas.data import (EpisodeBatch, EpisodeSampler, FixedEpisodes, ImageSplit, load_split, sample_episode_indices,
                       split_images_in_half, split_subset, synthetic_split)
from tnas.errors import TnasError

try:
    import data_fixtures as fx
except ImportError:  # tests/ imported as a package
    from tests import data_fixtures as fx


@pytest.fixture(scope="module")
def rgb_split():
    """12 classes of unequal sizes (20..31 images), 16x16 RGB."""
    rng = np.random.default_rng(0)
    sizes = np.arange(20, 32)
    labels = np.repeat(np.arange(12), sizes)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(labels.size, 16, 16, 3), dtype=np.uint8)
    return ImageSplit.from_arrays(images, labels, [f"c{i}" for i in range(12)], name="toy/train")


def expected_images(split, indices):
    images = np.asarray(split.images)[indices].astype(np.float32) / 255.0
    images = (images - np.asarray(split.mean, np.float32)) / np.asarray(split.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(images, -1, -3)))


def test_batch_layout_and_content(rgb_split):
    n, k, q, tasks = 5, 2, 3, 4
    indices = EpisodeSampler(rgb_split, n, k, q, tasks, seed=7).sample_indices()
    batch = EpisodeSampler(rgb_split, n, k, q, tasks, seed=7).sample()
    assert isinstance(batch, EpisodeBatch)
    assert batch.support_x.shape == (tasks, n * k, 3, 16, 16) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (tasks, n * q, 3, 16, 16)
    assert batch.support_y.shape == (tasks, n * k) and batch.support_y.dtype == torch.int64
    assert batch.query_y.shape == (tasks, n * q) and batch.query_y.dtype == torch.int64
    assert batch.support_x.is_contiguous() and batch.query_x.is_contiguous()
    assert torch.equal(batch.support_y[0], torch.arange(n).repeat_interleave(k))
    assert torch.equal(batch.query_y[0], torch.arange(n).repeat_interleave(q))
    assert indices.shape == (tasks, n, k + q)
    support = indices[:, :, :k].reshape(tasks, n * k)
    query = indices[:, :, k:].reshape(tasks, n * q)
    torch.testing.assert_close(batch.support_x, expected_images(rgb_split, support), rtol=0, atol=1e-5)
    torch.testing.assert_close(batch.query_x, expected_images(rgb_split, query), rtol=0, atol=1e-5)
    for t in range(tasks):
        true_support = rgb_split.labels[support[t]]
        true_query = rgb_split.labels[query[t]]
        # one dataset class per episode label, the same in support and query, n distinct classes
        mapping = {int(y): int(c) for y, c in zip(batch.support_y[t], true_support)}
        assert len(set(mapping.values())) == n
        assert all(mapping[int(y)] == int(c) for y, c in zip(batch.query_y[t], true_query))
        assert not set(support[t]) & set(query[t])
        assert len(set(indices[t].reshape(-1))) == n * (k + q)


def test_class_order_is_random(rgb_split):
    indices = sample_episode_indices(rgb_split, np.random.default_rng(0), 200, 5, 2)
    first_classes = rgb_split.labels[indices[:, 0, 0]]
    assert len(set(first_classes.tolist())) == rgb_split.num_classes  # label 0 is not always the same class
    counts = np.bincount(rgb_split.labels[indices.reshape(-1)], minlength=12)
    assert counts.min() > 0


def test_seed_determinism_and_resume(rgb_split):
    a = EpisodeSampler(rgb_split, 5, 1, 4, 3, seed=11)
    b = EpisodeSampler(rgb_split, 5, 1, 4, 3, seed=11)
    c = EpisodeSampler(rgb_split, 5, 1, 4, 3, seed=12)
    first_a, first_b, first_c = a.sample(), b.sample(), c.sample()
    assert torch.equal(first_a.query_x, first_b.query_x)
    assert not torch.equal(first_a.query_x, first_c.query_x)
    state = json.loads(json.dumps(a.state_dict()))  # JSON-able
    expected = [a.sample() for _ in range(3)]
    resumed = EpisodeSampler(rgb_split, 5, 1, 4, 3, seed=999)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 1
    for want in expected:
        got = resumed.sample()
        assert torch.equal(got.support_x, want.support_x) and torch.equal(got.query_x, want.query_x)
    other = EpisodeSampler(rgb_split, 4, 1, 4, 3, seed=0)
    with pytest.raises(TnasError, match="n_way"):
        other.load_state_dict(state)


def test_augmentation(rgb_split):
    plain = EpisodeSampler(rgb_split, 3, 1, 2, 2, seed=5).sample()
    augmented = EpisodeSampler(rgb_split, 3, 1, 2, 2, seed=5, augment=True).sample()
    again = EpisodeSampler(rgb_split, 3, 1, 2, 2, seed=5, augment=True).sample()
    assert augmented.support_x.shape == plain.support_x.shape
    assert torch.equal(augmented.query_x, again.query_x)
    assert not torch.equal(augmented.query_x, plain.query_x)
    # a flip alone is an exact mirror of each image or the image itself
    flipped = EpisodeSampler(rgb_split, 3, 1, 2, 2, seed=5, augment="flip").sample()
    for image, original in zip(flipped.query_x.reshape(-1, 3, 16, 16), plain.query_x.reshape(-1, 3, 16, 16)):
        assert torch.equal(image, original) or torch.equal(image, original.flip(-1))
    shifted = EpisodeSampler(rgb_split, 3, 1, 2, 2, seed=5, augment="shift").sample()
    assert shifted.support_x.is_contiguous()
    with pytest.raises(TnasError, match="augment"):
        EpisodeSampler(rgb_split, augment="rotate")


def test_episode_errors(rgb_split):
    with pytest.raises(TnasError) as info:
        EpisodeSampler(rgb_split, n_way=13)
    assert "toy/train" in str(info.value) and "13" in str(info.value) and "12 classes" in str(info.value)
    with pytest.raises(TnasError) as info:
        EpisodeSampler(rgb_split, n_way=5, k_shot=5, q_query=16)
    message = str(info.value)
    assert "toy/train" in message and "'c0'" in message and "20 images" in message and "21" in message
    with pytest.raises(TnasError, match="k_shot"):
        EpisodeSampler(rgb_split, k_shot=0)
    with pytest.raises(TnasError, match="tasks_per_batch"):
        EpisodeSampler(rgb_split, tasks_per_batch=0)
    with pytest.raises(TnasError, match="episodes"):
        FixedEpisodes.generate(rgb_split, 5, 1, 1, episodes=0)


def test_few_images_per_class_on_disk(tmp_path):
    fx.build_class_folders(tmp_path / "mine", {"train": 6}, per_class=4)
    split = load_split("folder", "train", data_path=str(tmp_path / "mine"), cache_dir=str(tmp_path / "c"), img_size=8)
    with pytest.raises(TnasError) as info:
        EpisodeSampler(split, 5, 1, 15)
    assert "folder/train" in str(info.value) and "4 images" in str(info.value) and "16" in str(info.value)
    batch = EpisodeSampler(split, 5, 1, 3, 2).sample()
    assert batch.query_x.shape == (2, 15, 3, 8, 8)


def test_fixed_episodes_roundtrip(rgb_split, tmp_path):
    fixed = FixedEpisodes.generate(rgb_split, 5, 1, 3, episodes=50, seed=3)
    assert len(fixed) == 50
    same = FixedEpisodes.generate(rgb_split, 5, 1, 3, episodes=50, seed=3)
    assert np.array_equal(fixed.indices, same.indices)
    for suffix in ("npz", "json"):
        path = fixed.save(tmp_path / f"episodes.{suffix}")
        loaded = FixedEpisodes.load(path, rgb_split, n_way=5, k_shot=1, q_query=3)
        assert np.array_equal(loaded.indices, fixed.indices)
    assert (tmp_path / "episodes.npz").stat().st_size < 20000
    batches = list(fixed.batches(16))
    assert [b.num_tasks for b in batches] == [16, 16, 16, 2]
    whole = fixed.batch(range(50))
    torch.testing.assert_close(torch.cat([b.query_x for b in batches]), whole.query_x)
    torch.testing.assert_close(torch.cat([b.support_y for b in batches]), whole.support_y)
    assert whole.support_x.shape == (50, 5, 3, 16, 16) and whole.query_x.shape == (50, 15, 3, 16, 16)
    single = fixed.batch([7])
    torch.testing.assert_close(single.query_x[0], whole.query_x[7])
    assert torch.equal(whole[3:5].support_x, whole.support_x[3:5]) and whole[2].num_tasks == 1


def test_fixed_episodes_mismatch(rgb_split, tmp_path):
    path = FixedEpisodes.generate(rgb_split, 5, 1, 3, episodes=10).save(tmp_path / "e.npz")
    with pytest.raises(TnasError, match="k_shot=1.*k_shot=5"):
        FixedEpisodes.load(path, rgb_split, n_way=5, k_shot=5)
    other = synthetic_split(12, 25, 16, 3, name="toy/test")
    with pytest.raises(TnasError, match="toy/train"):
        FixedEpisodes.load(path, other)
    changed = synthetic_split(12, 25, 16, 3, name="toy/train")
    with pytest.raises(TnasError, match="different version"):
        FixedEpisodes.load(path, changed)
    with pytest.raises(TnasError, match="does not exist"):
        FixedEpisodes.load(tmp_path / "none.npz", rgb_split)
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(TnasError, match="junk.npz"):
        FixedEpisodes.load(tmp_path / "junk.npz", rgb_split)


def test_split_subset_and_halves(rgb_split):
    first, second = split_images_in_half(rgb_split, seed=1)
    assert first.num_classes == second.num_classes == rgb_split.num_classes
    counts = rgb_split.class_counts()
    assert (first.class_counts() == (counts + 1) // 2).all() and (second.class_counts() == counts // 2).all()
    assert first.mean == rgb_split.mean and first.class_names == rgb_split.class_names
    # the halves partition the images: compare pixel rows as bytes
    rows = lambda s: {bytes(img) for img in np.asarray(s.images).reshape(len(s), -1)}  # noqa: E731
    assert not rows(first) & rows(second) and rows(first) | rows(second) == rows(rgb_split)
    again, _ = split_images_in_half(rgb_split, seed=1)
    assert np.array_equal(again.images, first.images)
    other, _ = split_images_in_half(rgb_split, seed=2)
    assert not np.array_equal(other.images, first.images)
    # the halves feed samplers like any split
    EpisodeSampler(first, 5, 1, 5, 2).sample()
    subset = split_subset(rgb_split, np.isin(rgb_split.labels, [3, 7]))
    assert subset.num_classes == 2 and subset.class_names == ["c3", "c7"]
    assert set(subset.labels.tolist()) == {0, 1}
    tiny = ImageSplit.from_arrays(np.zeros((3, 4, 4, 1), np.uint8), [0, 0, 1])
    with pytest.raises(TnasError, match="at least 2"):
        split_images_in_half(tiny)


def test_image_split_validation():
    with pytest.raises(TnasError, match="uint8"):
        ImageSplit.from_arrays(np.zeros((2, 4, 4, 3), np.float32), [0, 1])
    with pytest.raises(TnasError, match="labels"):
        ImageSplit.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), [0, 5], class_names=["a", "b"])
    split = synthetic_split(3, 4, 8, 1)
    assert split.image_shape == (1, 8, 8) and len(split) == 12


def test_batch_to_device(rgb_split):
    batch = EpisodeSampler(rgb_split, 2, 1, 1, 1).sample()
    moved = batch.to("cpu")
    assert moved.device.type == "cpu"
    support_x, support_y, query_x, query_y = moved
    assert support_x.shape == (1, 2, 3, 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(rgb_split):
    cpu = EpisodeSampler(rgb_split, 5, 1, 5, 3, seed=2).sample()
    for resident in (True, False):
        gpu = EpisodeSampler(rgb_split, 5, 1, 5, 3, device="cuda", seed=2, keep_on_device=resident)
        for _ in range(3):
            batch = gpu.sample()
        first = EpisodeSampler(rgb_split, 5, 1, 5, 3, device="cuda", seed=2, keep_on_device=resident).sample()
        assert first.support_x.is_cuda and first.query_y.is_cuda
        torch.testing.assert_close(first.query_x.cpu(), cpu.query_x, rtol=0, atol=1e-5)
        assert torch.equal(first.query_y.cpu(), cpu.query_y)
        assert batch.support_x.shape == cpu.support_x.shape
    augmented_cpu = EpisodeSampler(rgb_split, 5, 1, 5, 3, seed=2, augment=True).sample()
    augmented_gpu = EpisodeSampler(rgb_split, 5, 1, 5, 3, device="cuda", seed=2, augment=True).sample()
    torch.testing.assert_close(augmented_gpu.query_x.cpu(), augmented_cpu.query_x, rtol=0, atol=1e-5)
    fixed = FixedEpisodes.generate(rgb_split, 5, 1, 5, episodes=8)
    torch.testing.assert_close(fixed.batch(range(8), "cuda").query_x.cpu(), fixed.batch(range(8)).query_x)


def test_sampling_in_chunks_is_valid(rgb_split, monkeypatch):
    from tnas.data import episodes

    monkeypatch.setattr(episodes, "_MAX_SAMPLING_KEYS", 50)
    indices = sample_episode_indices(rgb_split, np.random.default_rng(0), 30, 4, 6)
    assert indices.shape == (30, 4, 6)
    for episode in indices:
        classes = rgb_split.labels[episode]
        assert (classes == classes[:, :1]).all() and len(set(classes[:, 0])) == 4
        assert len(set(episode.reshape(-1))) == 24


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_unavailable_is_one_line_error(rgb_split):
    with pytest.raises(TnasError, match="CUDA is not available"):
        EpisodeSampler(rgb_split, device="cuda")
    with pytest.raises(TnasError, match="not a torch device"):
        EpisodeSampler(rgb_split, device="gpu0")


def test_output_buffers_are_never_shared(rgb_split):
    """Batches the caller still holds (directly, through views, or in autograd) are never overwritten."""
    sampler = EpisodeSampler(rgb_split, 5, 1, 3, 2, seed=0)
    reference = EpisodeSampler(rgb_split, 5, 1, 3, 2, seed=0)
    kept = [sampler.sample() for _ in range(5)]
    expected = [reference.sample() for _ in range(5)]
    for got, want in zip(kept, expected):
        assert torch.equal(got.query_x, want.query_x)
    view = kept[0].support_x[0]
    pointer = view.data_ptr()
    del kept
    for _ in range(4):
        sampler.sample()
    assert view.data_ptr() == pointer and torch.equal(view, expected[0].support_x[0])
    # autograd keeps the input of a convolution; it must survive later batches
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    batch = sampler.sample()
    inputs = batch.query_x.flatten(0, 1)
    saved = inputs.clone()
    loss = torch.nn.functional.conv2d(inputs, weight).square().sum()
    del batch, inputs
    for _ in range(4):
        sampler.sample()
    loss.backward()
    check = weight.detach().clone().requires_grad_(True)
    torch.nn.functional.conv2d(saved, check).square().sum().backward()
    torch.testing.assert_close(weight.grad, check.grad)
