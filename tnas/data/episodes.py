"""Few-shot episodes from an `ImageSplit`: random meta-batches (`EpisodeSampler`) and a fixed,
saveable set of evaluation episodes (`FixedEpisodes`), both delivered as `EpisodeBatch`.

Layout of one meta-batch of T tasks, n-way, k-shot, q queries per class:

- ``support_x`` [T, n*k, C, H, W] float32, normalised ``(x/255 - mean) / std``;
- ``support_y`` [T, n*k] int64, class-major: ``[0]*k + [1]*k + ... + [n-1]*k``;
- ``query_x`` [T, n*q, C, H, W] and ``query_y`` [T, n*q], class-major the same way.

Label j of a task is the j-th of its n classes, drawn in random order, so labels carry no
information about the dataset's class ids. Support and query images of a task are distinct.

How a batch is made: episodes are integer index arrays (T, n, k+q) drawn with vectorised
numpy (a `numpy.random.Generator`, so a seed reproduces them and `state_dict` resumes them);
the uint8 images are gathered with one ``index_select``, moved to the device as uint8 (or
gathered there directly when the whole split is kept on the GPU), optionally augmented there
(random flips / shifts, uint8), then converted to float and normalised on the device
(:mod:`tnas.data.image_loader`).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch

from tnas.data.image_loader import ImageLoader
from tnas.data.split import ImageSplit
from tnas.errors import TnasError
from tnas.files import NPZ_READ_ERRORS, atomic_file

__all__ = ["EpisodeBatch", "EpisodeSampler", "FixedEpisodes", "sample_episode_indices", "check_episode_shape"]

AUGMENT_MODES = {False: (), None: (), True: ("flip", "shift"), "none": (), "flip": ("flip",), "shift": ("shift",),
                 "flip+shift": ("flip", "shift")}
_MAX_SAMPLING_KEYS = 1 << 22  # random keys drawn at once when choosing images within classes


@dataclass
class EpisodeBatch:
    """A meta-batch of T tasks (see the module docstring for the layout)."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
           non_blocking: bool = False) -> "EpisodeBatch":
        """The batch on ``device`` (None: where it is), its images (``support_x``, ``query_x``) as ``dtype``
        (None: as they are, float32; e.g. ``torch.float64`` for a float64 model); labels stay int64."""
        images = dict(dtype=dtype) if dtype is not None else {}
        return EpisodeBatch(self.support_x.to(device, non_blocking=non_blocking, **images),
                            self.support_y.to(device, non_blocking=non_blocking),
                            self.query_x.to(device, non_blocking=non_blocking, **images),
                            self.query_y.to(device, non_blocking=non_blocking))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.support_x, self.support_y, self.query_x, self.query_y))

    def __getitem__(self, tasks: Union[int, slice, Sequence[int], torch.Tensor]) -> "EpisodeBatch":
        """The batch restricted to some tasks (the task dimension is kept)."""
        if isinstance(tasks, int):
            tasks = slice(tasks, tasks + 1 if tasks != -1 else None)
        return EpisodeBatch(*(t[tasks] for t in self))

    @property
    def num_tasks(self) -> int:
        return int(self.support_x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.support_x.device


def check_episode_shape(split: ImageSplit, n_way: int, k_shot: int, q_query: int) -> None:
    """Raise TnasError unless every task of n_way classes with k_shot + q_query images each can be drawn."""
    for flag, value, low in (("n_way", n_way, 1), ("k_shot", k_shot, 1), ("q_query", q_query, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise TnasError(f"--{flag} must be an integer >= {low}, got {value!r}")
    if n_way > split.num_classes:
        raise TnasError(f"{split.name}: n_way={n_way} is more than the {split.num_classes} classes of this split")
    needed = k_shot + q_query
    counts = split.class_counts()
    small = np.flatnonzero(counts < needed)
    if small.size:
        worst = int(small[np.argmin(counts[small])])
        raise TnasError(f"{split.name}: class '{split.class_names[worst]}' has {int(counts[worst])} images, fewer than "
                        f"k_shot + q_query = {k_shot} + {q_query} = {needed} ({small.size} class(es) this small)")


def sample_episode_indices(split: ImageSplit, rng: np.random.Generator, tasks: int, n_way: int,
                           per_class: int) -> np.ndarray:
    """Image indices (tasks, n_way, per_class): n_way distinct classes per task in random order,
    per_class distinct images per class in random order. Fully vectorised."""
    order, offsets, counts = split.class_index()
    classes = np.argsort(rng.random((tasks, split.num_classes)), axis=1)[:, :n_way]
    class_counts = counts[classes]
    widest = int(class_counts.max())
    positions = np.empty((tasks, n_way, per_class), np.int64)
    step = max(1, _MAX_SAMPLING_KEYS // (n_way * widest))  # bounds memory for very large classes
    for start in range(0, tasks, step):
        stop = min(tasks, start + step)
        keys = rng.random((stop - start, n_way, widest))
        keys[np.arange(widest) >= class_counts[start:stop, :, None]] = 2.0  # past a class's size: never chosen
        if per_class < widest:
            candidates = np.argpartition(keys, per_class - 1, axis=-1)[..., :per_class]
        else:
            candidates = np.broadcast_to(np.arange(widest), keys.shape)
        chosen_keys = np.take_along_axis(keys, candidates, axis=-1)
        positions[start:stop] = np.take_along_axis(candidates, np.argsort(chosen_keys, axis=-1), axis=-1)
    return order[offsets[classes][..., None] + positions]


def _class_major_labels(tasks: int, n_way: int, per_class: int, device: torch.device) -> torch.Tensor:
    labels = torch.arange(n_way, device=device).repeat_interleave(per_class)
    return labels.unsqueeze(0).expand(tasks, -1).contiguous()


def _make_batch(loader: ImageLoader, indices: np.ndarray, k_shot: int, shifts: Optional[np.ndarray] = None,
                flips: Optional[np.ndarray] = None) -> EpisodeBatch:
    tasks, n_way, per_class = indices.shape
    q_query = per_class - k_shot
    flat = np.concatenate([indices[:, :, :k_shot].reshape(-1), indices[:, :, k_shot:].reshape(-1)])
    images = loader.load(flat, shifts, flips)
    n_support = tasks * n_way * k_shot
    shape = loader.item_shape
    support_x = images[:n_support].view(tasks, n_way * k_shot, *shape)
    query_x = images[n_support:].view(tasks, n_way * q_query, *shape)
    return EpisodeBatch(support_x, _class_major_labels(tasks, n_way, k_shot, loader.device),
                        query_x, _class_major_labels(tasks, n_way, q_query, loader.device))


class EpisodeSampler:
    """Random meta-batches of ``tasks_per_batch`` n-way k-shot tasks from a split.

    ``augment``: False (default), True / "flip+shift", "flip" or "shift": random horizontal
    flips and shifts of up to 10 % of the image size, drawn per image from the sampler's
    generator and applied on the device (leave off for characters: a flipped glyph is another
    class). ``keep_on_device``: "auto" keeps the whole uint8 split on a GPU when it takes less
    than 30 % of the free memory (no per-batch host transfer), True / False force it.
    ``sample()`` returns an `EpisodeBatch`; iterating the sampler yields batches forever.

    ``task_pool``: 0 (default) draws fresh episodes for every batch. N > 0 draws a pool of N
    episodes once (from ``seed``) and serves them in a random order, reshuffled at every pass
    over the pool, as the original T-NAS code does with its ``batch_size`` episodes (5,000
    for the search, 15,000 for from-scratch training), and each served episode's classes take
    new labels, as there; with N a multiple of
    ``tasks_per_batch`` one pass is N / tasks_per_batch batches, else a batch straddling two
    passes ends one and starts the next. Augmentation (if on) is still drawn per batch.
    """

    def __init__(self, split: ImageSplit, n_way: int = 5, k_shot: int = 1, q_query: int = 15,
                 tasks_per_batch: int = 4, device: Union[str, torch.device] = "cpu", seed: int = 0,
                 augment: Union[bool, str] = False, keep_on_device: Union[bool, str] = "auto",
                 task_slice: Optional[slice] = None, task_pool: int = 0) -> None:
        check_episode_shape(split, n_way, k_shot, q_query)
        if isinstance(tasks_per_batch, bool) or not isinstance(tasks_per_batch, (int, np.integer)) or tasks_per_batch < 1:
            raise TnasError(f"--tasks_per_batch must be an integer >= 1, got {tasks_per_batch!r}")
        task_pool = 0 if task_pool is None else task_pool
        if (isinstance(task_pool, bool) or not isinstance(task_pool, (int, np.integer))
                or (task_pool != 0 and task_pool < tasks_per_batch)):
            raise TnasError(f"--task_pool must be 0 (fresh episodes) or an integer >= --tasks_per_batch "
                            f"({tasks_per_batch}), got {task_pool!r}")
        key = augment.lower() if isinstance(augment, str) else augment
        if key not in AUGMENT_MODES:
            raise TnasError(f"augment must be one of False, True, 'flip', 'shift', 'flip+shift'; got {augment!r}")
        self.split = split
        self.n_way, self.k_shot, self.q_query = int(n_way), int(k_shot), int(q_query)
        self.tasks_per_batch = int(tasks_per_batch)
        self.augment = AUGMENT_MODES[key]
        self.seed = seed
        self.task_slice = task_slice
        self.batches_drawn = 0
        self._rng = np.random.default_rng(seed)
        self.task_pool = int(task_pool)
        self._pool: Optional[np.ndarray] = None  # (N, n_way, k_shot + q_query) image indices
        self._pool_order: List[int] = []  # episodes of the pool still to serve in this pass, in order
        if self.task_pool:
            self._pool = sample_episode_indices(split, self._rng, self.task_pool, self.n_way,
                                                self.k_shot + self.q_query)
        self._loader = ImageLoader(split, device, keep_on_device)
        self.device = self._loader.device
        _, height, width = split.image_shape
        self._max_shift = max(1, int(round(0.1 * min(height, width))))

    def sample_indices(self) -> np.ndarray:
        """Image indices of the next meta-batch, shape (T, n_way, k_shot + q_query); advances the state."""
        if self._pool is not None:
            indices = self._relabel(self._pool[self._next_pool_episodes(self.tasks_per_batch)])
        else:
            indices = sample_episode_indices(self.split, self._rng, self.tasks_per_batch, self.n_way,
                                             self.k_shot + self.q_query)
        self.batches_drawn += 1
        return indices

    def _relabel(self, indices: np.ndarray) -> np.ndarray:
        """``indices`` (T, n_way, per_class) with each task's classes in a fresh random order.

        Labels follow the class axis, so a pool episode served again gets new labels 0..n-1 for
        its classes, as the original code assigns them afresh every time it loads an episode:
        nothing ties a class to a label across passes over the pool.
        """
        tasks, n_way, _ = indices.shape
        order = self._rng.permuted(np.tile(np.arange(n_way), (tasks, 1)), axis=1)
        return np.take_along_axis(indices, order[:, :, None], axis=1)

    def _next_pool_episodes(self, count: int) -> np.ndarray:
        """The next ``count`` positions in the pool; a new random order starts each pass."""
        chosen: List[int] = []
        while len(chosen) < count:
            if not self._pool_order:
                self._pool_order = self._rng.permutation(self.task_pool).tolist()
            take = min(count - len(chosen), len(self._pool_order))
            chosen.extend(self._pool_order[:take])
            del self._pool_order[:take]
        return np.asarray(chosen, dtype=np.int64)

    def sample(self) -> EpisodeBatch:
        """The next meta-batch, on ``self.device``."""
        indices = self.sample_indices()
        count = indices.size
        shifts = flips = None
        if "flip" in self.augment:
            flips = self._rng.random(count) < 0.5
        if "shift" in self.augment:
            shifts = self._rng.integers(-self._max_shift, self._max_shift + 1, size=(count, 2))
        if self.task_slice is not None:  # data parallel: same draws on every rank, build only this rank's tasks
            indices, shifts, flips = self._slice_tasks(indices, shifts, flips)
        return _make_batch(self._loader, indices, self.k_shot, shifts, flips)

    def _slice_tasks(self, indices: np.ndarray, shifts: Optional[np.ndarray], flips: Optional[np.ndarray]):
        """Keep the tasks of ``task_slice``; per-image draws follow the loader's (support, query) order."""
        tasks, n_way, per_class = indices.shape
        keep = np.zeros(tasks, dtype=bool)
        keep[self.task_slice] = True

        def per_image(values: Optional[np.ndarray]) -> Optional[np.ndarray]:
            if values is None:
                return None
            support = values[:tasks * n_way * self.k_shot].reshape(tasks, -1, *values.shape[1:])
            query = values[tasks * n_way * self.k_shot:].reshape(tasks, -1, *values.shape[1:])
            return np.concatenate([support[keep].reshape(-1, *values.shape[1:]),
                                   query[keep].reshape(-1, *values.shape[1:])])

        return indices[keep], per_image(shifts), per_image(flips)

    def __iter__(self) -> Iterator[EpisodeBatch]:
        while True:
            yield self.sample()

    def _config(self) -> Dict[str, Any]:
        config = {"split": self.split.name, "n_way": self.n_way, "k_shot": self.k_shot, "q_query": self.q_query,
                  "tasks_per_batch": self.tasks_per_batch, "augment": list(self.augment),
                  "num_images": len(self.split)}
        if self.task_pool:  # the pool is redrawn from the seed on resume: both must match
            config.update(task_pool=self.task_pool, seed=self.seed)
        return config

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue the exact sequence of batches (picklable, JSON-able)."""
        state = {"rng": self._rng.bit_generator.state, "batches_drawn": self.batches_drawn, "config": self._config()}
        if self.task_pool:
            state["pool_order"] = list(self._pool_order)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        config = state.get("config", {})
        mine = self._config()
        different = [k for k in mine if config.get(k, 0 if k == "task_pool" else mine[k]) != mine[k]]
        if config.get("task_pool") and not self.task_pool:
            different.insert(0, "task_pool")
        if different:
            key = different[0]
            raise TnasError(f"sampler state was saved with {key}={config.get(key, 0)!r}, "
                           f"this sampler has {key}={mine.get(key, 0)!r}")
        rng = np.random.default_rng()
        try:
            rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as error:
            raise TnasError(f"sampler state has no valid 'rng' entry ({error})") from None
        self._rng = rng
        self.batches_drawn = int(state.get("batches_drawn", 0))
        if self.task_pool:
            self._pool_order = [int(i) for i in state.get("pool_order", [])]


class FixedEpisodes:
    """A fixed list of evaluation episodes (image indices), generated from a seed and saveable.

    Every method evaluated on the same file is scored on the same tasks. Files are small:
    ``.npz`` (default) or ``.json`` holding the index array (episodes, n_way, k_shot + q_query),
    the shape of the task, the split name and a fingerprint of the split's labels.
    """

    FORMAT = 1

    def __init__(self, split: ImageSplit, indices: np.ndarray, n_way: int, k_shot: int, q_query: int,
                 seed: Optional[int] = None) -> None:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 3 or indices.shape[1:] != (n_way, k_shot + q_query):
            raise TnasError(f"episode indices must have shape (episodes, {n_way}, {k_shot + q_query}), got {indices.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= len(split)):
            raise TnasError(f"{split.name}: episode indices refer to image {int(indices.max())}, "
                            f"but the split has {len(split)} images")
        self.split = split
        self.indices = indices
        self.n_way, self.k_shot, self.q_query = int(n_way), int(k_shot), int(q_query)
        self.seed = seed
        self._loaders: Dict[str, ImageLoader] = {}

    @classmethod
    def generate(cls, split: ImageSplit, n_way: int, k_shot: int, q_query: int, episodes: int = 600,
                 seed: int = 0) -> "FixedEpisodes":
        check_episode_shape(split, n_way, k_shot, q_query)
        if isinstance(episodes, bool) or not isinstance(episodes, (int, np.integer)) or episodes < 1:
            raise TnasError(f"--episodes must be an integer >= 1, got {episodes!r}")
        rng = np.random.default_rng(seed)
        indices = sample_episode_indices(split, rng, int(episodes), n_way, k_shot + q_query)
        return cls(split, indices, n_way, k_shot, q_query, seed)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def indices_sha256(self) -> str:
        """Hex SHA-256 of the episodes' image indices (as int64, in episode order): equal for two sets of
        episodes exactly when they are the same tasks in the same order (results.json records it, so two
        results can be checked to come from the same test tasks)."""
        return hashlib.sha256(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes()).hexdigest()

    def _loader(self, device: Union[str, torch.device]) -> ImageLoader:
        key = str(torch.device(device))
        if key not in self._loaders:
            self._loaders[key] = ImageLoader(self.split, device)
        return self._loaders[key]

    def batch(self, episodes: Union[Sequence[int], np.ndarray, slice], device: Union[str, torch.device] = "cpu") -> EpisodeBatch:
        """The given episodes as one `EpisodeBatch` (tasks in the order given)."""
        chosen = self.indices[episodes] if isinstance(episodes, slice) else self.indices[np.asarray(episodes, np.int64)]
        if chosen.ndim == 2:
            chosen = chosen[None]
        if chosen.shape[0] == 0:
            raise TnasError("FixedEpisodes.batch: no episodes selected")
        return _make_batch(self._loader(device), chosen, self.k_shot)

    def batches(self, batch_size: int, device: Union[str, torch.device] = "cpu") -> Iterator[EpisodeBatch]:
        """All episodes in order, ``batch_size`` tasks at a time (the last batch may be smaller)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise TnasError(f"batch size must be an integer >= 1, got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.batch(slice(start, start + batch_size), device)

    # ----------------------------------------------------------------- files
    def _header(self) -> Dict[str, Any]:
        return {"format": self.FORMAT, "split": self.split.name, "n_way": self.n_way, "k_shot": self.k_shot,
                "q_query": self.q_query, "episodes": len(self), "seed": self.seed, "num_images": len(self.split),
                "labels_fingerprint": self.split.labels_fingerprint()}

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the episodes to ``path`` (.json, else .npz), atomically; returns the path written."""
        path = os.fspath(path)
        header = self._header()
        dtype = np.int32 if len(self.split) < 2 ** 31 else np.int64
        with atomic_file(path, "episodes file ") as stream:
            if path.lower().endswith(".json"):
                stream.write(json.dumps(dict(header, indices=self.indices.tolist())).encode())
            else:
                np.savez_compressed(stream, indices=self.indices.astype(dtype), header=json.dumps(header))
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike], split: ImageSplit, n_way: Optional[int] = None,
             k_shot: Optional[int] = None, q_query: Optional[int] = None) -> "FixedEpisodes":
        """Read episodes saved by `save`; TnasError if they do not belong to ``split`` or to the
        given task shape (n_way / k_shot / q_query, when given)."""
        path = os.fspath(path)
        try:
            if path.lower().endswith(".json"):
                with open(path, "r", encoding="utf-8") as stream:
                    data = json.load(stream)
                if not isinstance(data, dict):
                    raise ValueError(f"it holds a JSON {type(data).__name__}, not an object with a header and indices")
                header, indices = data, np.asarray(data["indices"], dtype=np.int64)
            else:
                with np.load(path, allow_pickle=False) as archive:
                    header = json.loads(str(archive["header"]))
                    if not isinstance(header, dict):
                        raise ValueError("its header is not a JSON object")
                    indices = archive["indices"].astype(np.int64)
        except FileNotFoundError:
            raise TnasError(f"episode file {path} does not exist") from None
        except (KeyError, TypeError, *NPZ_READ_ERRORS) as error:
            raise TnasError(f"{path}: not an episode file written by FixedEpisodes.save "
                            f"({type(error).__name__}: {error})") from None
        except RecursionError:
            raise TnasError(f"{path}: not an episode file written by FixedEpisodes.save (JSON nested too deeply)") from None
        if header.get("split") != split.name:
            raise TnasError(f"{path}: episodes were drawn from split '{header.get('split')}', not '{split.name}'")
        for key, wanted in (("n_way", n_way), ("k_shot", k_shot), ("q_query", q_query)):
            if wanted is not None and header.get(key) != wanted:
                raise TnasError(f"{path}: episodes have {key}={header.get(key)}, but {key}={wanted} was asked for")
        if header.get("num_images") != len(split) or header.get("labels_fingerprint") != split.labels_fingerprint():
            raise TnasError(f"{path}: episodes were drawn from a different version of '{split.name}' "
                            f"({header.get('num_images')} images then, {len(split)} now)")
        for key in ("n_way", "k_shot", "q_query"):
            if not isinstance(header.get(key), int) or isinstance(header.get(key), bool):
                raise TnasError(f"{path}: its header has {key} {header.get(key)!r}, not an integer")
        try:
            return cls(split, indices, header["n_way"], header["k_shot"], header["q_query"], header.get("seed"))
        except TnasError as error:  # the indices do not fit the split or the task shape
            raise TnasError(f"{path}: {error}") from None
