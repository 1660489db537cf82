"""Decoding and resizing images into uint8 arrays, in parallel; used once, when a cache is built.

Items are file paths (str), encoded image bytes (or a 1-D uint8 array of them), or already
decoded arrays (H, W) / (H, W, C). Each becomes (img_size, img_size, channels) uint8:
converted to 'L' (channels=1) or 'RGB' (channels=3) with PIL, then resized to a square with
Lanczos filtering when its size differs (the aspect ratio is not kept, as in the usual
mini-ImageNet preprocessing). Work is spread over processes with ``concurrent.futures``.

This module imports no torch, so worker processes start light.
"""
from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from tnas.errors import TnasError

__all__ = ["decode_into", "convert_array", "default_workers"]

_CHUNK = 128
_PARALLEL_MIN_ITEMS = 1500


def default_workers() -> int:
    """Worker processes for decoding: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _describe(item: Any, index: int, origin: str) -> str:
    if isinstance(item, str):
        return item
    return f"image #{index} of {origin}"


RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}
"""Resize methods: Lanczos (sharpest), or bilinear as the original T-NAS loader (torchvision's Resize)."""


def _decode_one(item: Any, img_size: int, channels: int, resize: str = "lanczos") -> np.ndarray:
    mode = "L" if channels == 1 else "RGB"
    if isinstance(item, np.ndarray) and item.ndim >= 2:
        image = Image.fromarray(item if item.ndim == 2 or item.shape[-1] != 1 else item[..., 0])
    else:
        if isinstance(item, np.ndarray):
            item = item.tobytes()
        source = item if isinstance(item, str) else io.BytesIO(item)
        image = Image.open(source)
        if resize == "lanczos" and image.format == "JPEG" and min(image.size) >= 2 * img_size:
            image.draft(mode, (img_size, img_size))  # decode at a reduced DCT scale: much faster
        image.load()
    if image.mode != mode:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        elif image.mode.startswith("I;16") or image.mode == "I":
            array = np.asarray(image, dtype=np.float64)
            peak = max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array * (255.0 / (65535.0 if peak > 255 else 255.0)), 0, 255).astype(np.uint8))
        image = image.convert(mode)
    if image.size != (img_size, img_size):
        image = image.resize((img_size, img_size), RESAMPLING[resize])
    array = np.asarray(image, dtype=np.uint8)
    if channels == 1:
        array = array[..., None]
    return array


def _decode_chunk(args: Tuple[int, Sequence[Any], int, int, str, str]
                  ) -> Tuple[int, Optional[np.ndarray], Optional[str]]:
    start, items, img_size, channels, origin, resize = args
    out = np.empty((len(items), img_size, img_size, channels), np.uint8)
    for offset, item in enumerate(items):
        try:
            out[offset] = _decode_one(item, img_size, channels, resize)
        except Exception as error:  # PIL raises many kinds of errors on bad files
            what = _describe(item, start + offset, origin)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            return start, None, f"corrupt or unreadable image {what}: {message}"
    return start, out, None


def _pool_context() -> Any:
    # fork starts workers instantly and they inherit the imported modules; elsewhere use the default.
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _end_with_parent(parent: int) -> None:
    """A decoding worker's initializer: on Linux the worker is killed when the process that started it
    dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``). A run killed outright (SIGKILL, the OOM killer) would
    otherwise leave its workers waiting for work forever, holding their memory. Elsewhere: nothing."""
    import ctypes
    import signal

    try:
        set_death_signal = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl: not Linux
        return
    set_death_signal(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the signal was set
        os._exit(1)


def _worker_pool(workers: int) -> ProcessPoolExecutor:
    """``workers`` decoding processes that end with the process that started them."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_end_with_parent,
                               initargs=(os.getpid(),))


def decode_into(out: np.ndarray, items: Sequence[Any], img_size: int, channels: int, origin: str,
                num_workers: Optional[int] = None, progress: Optional[bool] = None, desc: str = "decoding",
                resize: str = "lanczos") -> None:
    """Decode ``items`` into ``out`` (N, img_size, img_size, channels) uint8, raising TnasError on a bad image;
    ``resize``: a key of :data:`RESAMPLING`."""
    from tqdm import tqdm

    total = len(items)
    workers = default_workers() if num_workers is None else max(1, int(num_workers))
    chunks = [(start, items[start:start + _CHUNK], img_size, channels, origin, resize)
              for start in range(0, total, _CHUNK)]
    bar = tqdm(total=total, desc=desc, unit="img", disable=_progress_disabled(progress), dynamic_ncols=True,
               leave=False)
    try:
        if workers == 1 or total < _PARALLEL_MIN_ITEMS:
            results: Any = map(_decode_chunk, chunks)
            _collect(results, out, bar)
        else:
            with _worker_pool(workers) as pool:
                try:
                    _collect(pool.map(_decode_chunk, chunks), out, bar)
                except TnasError:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    finally:
        bar.close()


def _progress_disabled(progress: Optional[bool]) -> Optional[bool]:
    """tqdm's ``disable``: the caller's choice, else TNAS_PROGRESS=0/1, else None (on for a terminal)."""
    if progress is not None:
        return not progress
    setting = os.environ.get("TNAS_PROGRESS", "").strip()
    if setting in ("0", "1"):
        return setting == "0"
    return None


def _collect(results: Any, out: np.ndarray, bar: Any) -> None:
    for start, block, error in results:
        if error is not None:
            raise TnasError(error)
        out[start:start + block.shape[0]] = block
        bar.update(block.shape[0])


def convert_array(images: np.ndarray, img_size: int, channels: int, out: np.ndarray, origin: str,
                  num_workers: Optional[int] = None, progress: Optional[bool] = None, desc: str = "converting",
                  rows: Optional[np.ndarray] = None, resize: str = "lanczos") -> None:
    """Write ``images[rows]`` (N, h, w, c) uint8 into ``out`` at img_size/channels.

    Same size: a vectorised copy (with RGB->L by PIL's integer formula, or L->RGB by
    repetition). Another size: resized image by image through PIL, in parallel.
    """
    if images.ndim == 3:
        images = images[..., None]
    rows = np.arange(images.shape[0]) if rows is None else np.asarray(rows)
    height, width, have = images.shape[1:]
    if (height, width) == (img_size, img_size):
        block = 4096
        for start in range(0, rows.size, block):
            chunk = np.asarray(images[rows[start:start + block]])
            out[start:start + chunk.shape[0]] = _convert_channels(chunk, channels)
        return
    items: List[np.ndarray] = _RowView(images, rows)  # type: ignore[assignment]
    decode_into(out, items, img_size, channels, origin, num_workers, progress, desc, resize)


def _convert_channels(block: np.ndarray, channels: int) -> np.ndarray:
    have = block.shape[-1]
    if have == channels:
        return block
    if channels == 3:
        return np.repeat(block[..., :1], 3, axis=-1)
    rgb = block[..., :3].astype(np.uint32)
    gray = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return gray.astype(np.uint8)[..., None]


class _RowView:
    """A lazily indexed sequence of rows, so chunks are sliced without copying the whole array."""

    def __init__(self, images: np.ndarray, rows: np.ndarray) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return int(self.rows.size)

    def __getitem__(self, key: slice) -> List[np.ndarray]:
        return [np.asarray(self.images[r]) for r in self.rows[key]]


def parallel_map(function: Callable[[Any], Any], jobs: Sequence[Any], num_workers: Optional[int], parallel: bool) -> List[Any]:
    """``[function(job) for job in jobs]``, across processes when ``parallel``; order kept."""
    workers = default_workers() if num_workers is None else max(1, int(num_workers))
    if workers == 1 or not parallel or len(jobs) < 2:
        return [function(job) for job in jobs]
    with _worker_pool(min(workers, len(jobs))) as pool:
        return list(pool.map(function, jobs))
