"""The one-time uint8 cache: every (dataset, split, image size, channels, options, data path)
is decoded once into ``images.npy`` (N, H, W, C) uint8, ``labels.npy`` (N,) int64 and
``meta.json`` (class names, per-channel statistics, source fingerprint), then memory-mapped.

Layout: ``<cache_dir>/<dataset>/<split>-<size>px-<channels>ch-<hash>/`` where the hash covers
the dataset, split, resolved absolute data path, size, channels, options and the cache
format version, so two datasets never collide. ``cache_dir`` defaults to ``$TNAS_CACHE_DIR``
or ``~/.cache/tnas``.

Writing is atomic: an entry is built in a temporary sibling directory, its files fsynced, and renamed
into place (``os.replace``); an entry that cannot be read back whole (an empty or short ``.npy``) is
rebuilt. A process that loses the race drops its copy and uses the winner's. An entry
whose source fingerprint (every file's name, size and modification time:
:func:`files_fingerprint`) no longer matches the files on disk is rebuilt. Before decoding, the
builder checks the free space and reserves the whole images file (``posix_fallocate``), so a
full disk is one error line instead of a ``SIGBUS`` from a write into a memory map, and the
half-built entry is removed. Temporary directories of killed builds are removed by the next
build of that entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from tnas.data.decode import convert_array, decode_into
from tnas.errors import TnasError
from tnas.files import fsync_directory, keep_from_forked_children

__all__ = ["CACHE_VERSION", "default_cache_dir", "RawSplit", "SplitSource", "CacheEntry", "open_cache_entry",
           "entry_directory", "files_fingerprint"]

CACHE_VERSION = 1


def default_cache_dir() -> str:
    """``$TNAS_CACHE_DIR`` if set, else ``~/.cache/tnas``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TNAS_CACHE_DIR") or "~/.cache/tnas"))


def files_fingerprint(paths: Sequence[str], names: Optional[Sequence[str]] = None, extra: str = "") -> str:
    """Hex digest of each file's name (``names``, default the basename), size and modification time:
    an image edited, replaced, added or removed in place changes it."""
    digest = hashlib.sha1(extra.encode("utf-8", "surrogateescape"))
    for index, path in enumerate(paths):
        try:
            stat = os.stat(path)
        except OSError as error:
            raise TnasError(f"cannot read {path}: {error.strerror or error}") from None
        name = names[index] if names is not None else os.path.basename(path)
        digest.update(f"{name}\0{stat.st_size}:{stat.st_mtime_ns};".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:16]


def free_bytes(directory: str) -> int:
    """Bytes free for us under ``directory`` (``shutil.disk_usage``)."""
    return shutil.disk_usage(directory).free


@dataclass
class RawSplit:
    """What a reader hands to the cache builder for one split.

    Exactly one of ``paths`` (image files), ``encoded`` (encoded image bytes) or ``array``
    (decoded uint8 images (N, h, w, c), optionally restricted to ``rows``) is set.
    ``labels`` are 0..len(class_names)-1 for the images in that order. ``origin`` names the
    file(s) in error messages. ``postprocess`` (optional) maps the decoded (images, labels,
    class_names) to new ones (e.g. Omniglot rotations); it runs in memory.
    """

    labels: np.ndarray
    class_names: List[str]
    origin: str
    paths: Optional[Sequence[str]] = None
    encoded: Optional[Sequence[Any]] = None
    array: Optional[np.ndarray] = None
    rows: Optional[np.ndarray] = None
    postprocess: Optional[Callable[[np.ndarray, np.ndarray, List[str]], tuple]] = None
    generate: Optional[Callable[[np.ndarray, Optional[int], Optional[bool]], None]] = None
    resize: str = "lanczos"  # how images of another size are resized (tnas.data.decode.RESAMPLING)


@dataclass
class SplitSource:
    """A split found on disk: cheap to make (lists files, stats pickles); ``load`` does the heavy part."""

    fingerprint: str
    location: str
    load: Callable[[], RawSplit]


@dataclass
class CacheEntry:
    directory: str
    images: np.ndarray
    labels: np.ndarray
    meta: Dict[str, Any]


def entry_directory(cache_dir: Optional[str], dataset: str, split: str, img_size: int, channels: int,
                    data_path: Optional[str], options: Dict[str, Any]) -> str:
    """Directory of the cache entry for these settings (it may not exist yet)."""
    root = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    key = {"version": CACHE_VERSION, "dataset": dataset, "split": split, "img_size": int(img_size),
           "channels": int(channels), "data_path": data_path, "options": _jsonable(options)}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(root, dataset, f"{split}-{img_size}px-{channels}ch-{digest}")


def _jsonable(options: Dict[str, Any]) -> Dict[str, Any]:
    return {str(k): (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v))
            for k, v in sorted(options.items())}


def _read_entry(directory: str) -> Optional[CacheEntry]:
    meta_path = os.path.join(directory, "meta.json")
    try:
        with open(meta_path, "r", encoding="utf-8") as handle:
            meta = json.load(handle)
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            return None
        images = np.load(os.path.join(directory, "images.npy"), mmap_mode="r")
        labels = np.load(os.path.join(directory, "labels.npy"))
    except (OSError, ValueError, EOFError):  # EOFError: an empty .npy (a crash before its data reached the disk)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (images.shape[0],):
        return None
    return CacheEntry(directory, images, labels.astype(np.int64, copy=False), meta)


def open_cache_entry(directory: str, name: str, img_size: int, channels: int,
                     source: Optional[SplitSource], source_error: Optional[TnasError] = None,
                     num_workers: Optional[int] = None, progress: Optional[bool] = None) -> CacheEntry:
    """Return the cache entry in ``directory``, building it from ``source`` if missing or stale.

    ``source`` is None when the raw files could not be found (``source_error`` says why); an
    existing entry is then used as is, otherwise ``source_error`` is raised.
    """
    entry = _read_entry(directory)
    if entry is not None and (source is None or entry.meta.get("fingerprint") == source.fingerprint):
        return entry
    if source is None:
        assert source_error is not None
        raise source_error
    with _build_lock(directory) as locked:
        # another process (e.g. another rank of a distributed run) may have built it meanwhile
        entry = _read_entry(directory)
        if entry is not None and entry.meta.get("fingerprint") == source.fingerprint:
            return entry
        return _build_entry(directory, name, img_size, channels, source, num_workers, progress,
                            stale_after=0.0 if locked else 24 * 3600.0)


@contextlib.contextmanager
def _build_lock(directory: str) -> Iterator[None]:
    """Let one process at a time build an entry (advisory ``flock``; no lock where unsupported).

    Correctness never depends on it (entries are installed atomically); it only saves the
    other processes from decoding the same data at the same time.
    """
    handle = None
    try:
        import fcntl

        os.makedirs(os.path.dirname(directory), exist_ok=True)
        handle = keep_from_forked_children(open(f"{directory}.lock", "a+"))  # the decoding workers fork
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):
        if handle is not None:
            handle.close()
        handle = None
    try:
        yield handle is not None
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock


def _build_entry(directory: str, name: str, img_size: int, channels: int, source: SplitSource,
                 num_workers: Optional[int], progress: Optional[bool], stale_after: float = 24 * 3600.0) -> CacheEntry:
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
        _remove_abandoned(parent, os.path.basename(directory), stale_after)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    except OSError as error:
        raise TnasError(f"cannot write the cache under {parent}: {error.strerror or error} "
                        f"(set --cache_dir or TNAS_CACHE_DIR to a writable directory)") from None
    try:
        started = time.time()
        raw = source.load()
        labels = np.asarray(raw.labels, dtype=np.int64)
        class_names = [str(n) for n in raw.class_names]
        count = labels.shape[0]
        images_path = os.path.join(tmp, "images.npy")
        if count == 0:
            raise TnasError(f"{name}: no images found in {source.location}")
        images = _reserved_memmap(images_path, (count, img_size, img_size, channels), name, parent)
        desc = f"caching {name}"
        if raw.generate is not None:
            raw.generate(images, num_workers, progress)
        elif raw.paths is not None:
            decode_into(images, list(raw.paths), img_size, channels, raw.origin, num_workers, progress, desc,
                        raw.resize)
        elif raw.encoded is not None:
            decode_into(images, raw.encoded, img_size, channels, raw.origin, num_workers, progress, desc, raw.resize)
        elif raw.array is not None:
            convert_array(raw.array, img_size, channels, images, raw.origin, num_workers, progress, desc, raw.rows,
                          raw.resize)
        else:  # pragma: no cover - reader bug
            raise TnasError(f"{name}: reader produced no images")
        images.flush()
        if raw.postprocess is not None:
            decoded = np.array(images)
            del images
            decoded, labels, class_names = raw.postprocess(decoded, labels, class_names)
            labels = np.asarray(labels, dtype=np.int64)
            np.save(images_path, np.ascontiguousarray(decoded, dtype=np.uint8))
            del decoded
            images = np.load(images_path, mmap_mode="r")
        del raw
        _finish(tmp, images, labels, class_names, source, started, name, img_size, channels)
        del images
        _persist(tmp)
        _install(tmp, directory)
        fsync_directory(parent)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TnasError(f"{name}: cannot write the cache entry in {parent}: {error.strerror or error}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = _read_entry(directory)
    if entry is None:  # pragma: no cover - disk trouble
        raise TnasError(f"{name}: the cache entry {directory} could not be read back after writing it")
    return entry


def _reserved_memmap(path: str, shape: tuple, name: str, parent: str) -> np.ndarray:
    """A writable ``.npy`` memory map of ``shape`` uint8 whose disk blocks are reserved up front.

    Writing into a sparse memory-mapped file on a full disk kills the process with ``SIGBUS``;
    so the free space is checked first and the file's blocks are allocated with
    ``posix_fallocate`` (where the OS has it) before any pixel is written. Not enough space is
    one :class:`TnasError` line.
    """
    needed = int(np.prod(shape)) + 4096
    available = free_bytes(parent)
    if available < needed + (64 << 20):  # keep a margin for labels, meta.json and the rest of the system
        raise TnasError(f"{name}: the cache entry needs {needed / 2**20:.1f} MiB in {parent}, only "
                        f"{available / 2**20:.1f} MiB free (free some space or set --cache_dir / TNAS_CACHE_DIR)")
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    allocate = getattr(os, "posix_fallocate", None)
    if allocate is not None:
        fd = os.open(path, os.O_RDWR)
        try:
            allocate(fd, 0, os.fstat(fd).st_size)
        except OSError as error:
            import errno

            if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
                del images
                raise
        finally:
            os.close(fd)
    return images


def _remove_abandoned(parent: str, base: str, age_seconds: float = 24 * 3600) -> None:
    """Delete temporary build directories of this entry left by killed processes: all of them when
    this process holds the entry's build lock (``age_seconds`` 0), else those older than a day."""
    now = time.time()
    for name in os.listdir(parent):
        if name.startswith((f".{base}.tmp-", f"{base}.stale-")):
            path = os.path.join(parent, name)
            try:
                if now - os.path.getmtime(path) >= age_seconds:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass


def _finish(tmp: str, images: np.ndarray, labels: np.ndarray, class_names: List[str], source: SplitSource,
            started: float, name: str, img_size: int, channels: int) -> None:
    from tnas.data.split import channel_statistics

    mean, std = channel_statistics(images)
    np.save(os.path.join(tmp, "labels.npy"), labels)
    counts = np.bincount(labels, minlength=len(class_names))
    meta = {"version": CACHE_VERSION, "name": name, "class_names": class_names, "num_images": int(labels.shape[0]),
            "image_shape": [channels, img_size, img_size], "pixel_mean": list(mean), "pixel_std": list(std),
            "min_class_size": int(counts.min()) if counts.size else 0, "fingerprint": source.fingerprint,
            "source": source.location, "build_seconds": round(time.time() - started, 3)}
    with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)


def _persist(directory: str) -> None:
    """fsync every file of a finished entry, then its directory, before the entry is renamed into place:
    the rename may otherwise reach the disk before the data, and a crash in between leaves an installed
    entry with empty or zeroed files (an empty ``labels.npy`` is rebuilt; zeroed pixels would not be noticed).
    A failed fsync of a file is an OSError, which the builder reports in one line."""
    for name in sorted(os.listdir(directory)):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_directory(directory)


def _install(tmp: str, directory: str) -> None:
    """Move the finished entry into place; replace a stale one; let a concurrent winner stand."""
    for _ in range(3):
        try:
            os.replace(tmp, directory)
            return
        except OSError:
            existing = _read_entry(directory)
            with open(os.path.join(tmp, "meta.json"), "r", encoding="utf-8") as handle:
                ours = json.load(handle)
            if existing is not None and existing.meta.get("fingerprint") == ours.get("fingerprint"):
                shutil.rmtree(tmp, ignore_errors=True)  # another process built the same entry first
                return
            trash = f"{directory}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(directory, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    raise TnasError(f"could not install the cache entry {directory}; remove it and retry")
