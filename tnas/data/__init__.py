"""Episodic few-shot data: dataset formats -> uint8 cache -> episode samplers; plus the glyphs demo.

>>> from tnas.data import load_split, EpisodeSampler, FixedEpisodes
>>> train = load_split("glyphs", "train")                        # rendered and cached on first use
>>> sampler = EpisodeSampler(train, n_way=5, k_shot=1, q_query=15, tasks_per_batch=4, seed=0)
>>> batch = sampler.sample()                                      # batch.support_x: [4, 5, 1, 28, 28]
>>> test = load_split("glyphs", "test")
>>> fixed = FixedEpisodes.generate(test, 5, 1, 15, episodes=600, seed=0)
>>> for batch in fixed.batches(50): ...

Datasets (``DATASETS``): miniimagenet, omniglot, cifar_fs, fc100, tieredimagenet, folder,
glyphs; their on-disk layouts are described in ``docs/datasets.md``.
"""
from tnas.data.datasets import DATASETS, SPLITS, DatasetSpec, get_dataset, load_split
from tnas.data.episodes import (EpisodeBatch, EpisodeSampler, FixedEpisodes, check_episode_shape,
                                sample_episode_indices)
from tnas.data.split import ImageSplit, split_images_in_half, split_subset, synthetic_split
from tnas.data.cache import default_cache_dir

__all__ = [
    "DATASETS", "SPLITS", "DatasetSpec", "get_dataset", "load_split",
    "EpisodeBatch", "EpisodeSampler", "FixedEpisodes", "check_episode_shape", "sample_episode_indices",
    "ImageSplit", "split_images_in_half", "split_subset", "synthetic_split", "default_cache_dir",
]
