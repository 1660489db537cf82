"""What a run leaves in its run directory: atomic files, checkpoints, log.txt, tensorboard.

Every file a later stage reads (results JSON, ``last.pt``, ``best.pt``, ``config.yaml``) is
written atomically: the bytes go to a temporary file in the same directory, are fsynced,
and then ``os.replace`` swaps it in, so a crash or a full disk never leaves a half-written
file under the real name. :class:`RunLogger` writes timestamped lines to ``log.txt`` (and
stdout, through ``tqdm.write`` so progress bars survive) and scalars, text, images and
heatmaps to tensorboard events under ``<run>/tb`` (tensorboardX, created on first use).
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from tnas.errors import TnasError

# Temp files are created 0600; give the final file the usual permissions (0666 & ~umask).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def _atomic_file(path) -> Iterator[IO[bytes]]:
    """Yield a binary temp file beside ``path``; on success fsync it and move it onto ``path``.

    On any exception the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        mode="wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(OSError):
            os.chmod(handle.name, _FILE_MODE)
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (best effort; not possible on every OS/filesystem)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failed(path, error: OSError, what: str) -> TnasError:
    """The one-line error of a failed atomic write (the temp file is gone; the old file is intact)."""
    kept = "the previous one is kept" if Path(path).exists() else "nothing was written"
    return TnasError(f"cannot write {what}{path}: {error.strerror or error}; {kept}")


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace); a failed
    write (full disk, no permission) is one :class:`TnasError` line and keeps the previous file."""
    try:
        with _atomic_file(path) as handle:
            handle.write(data)
    except OSError as error:
        raise _write_failed(path, error, "") from None


def atomic_write_json(path, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path) -> Any:
    """The JSON value in ``path``, or None when the file is missing, unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(state: dict, path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically: readers never see a half-written file.

    ``state`` must hold only what :func:`load_checkpoint` accepts (tensors, plain Python
    containers and scalars, torch dtypes). A failed write (full disk, say) is one
    :class:`TnasError` line; the previous file under ``path`` is kept and no temp file is left.
    """
    import torch

    try:
        with _atomic_file(path) as handle:
            torch.save(state, handle)
    except OSError as error:
        raise _write_failed(path, error, "checkpoint ") from None


# Types a checkpoint written before numpy RNG states were stored as plain lists may hold (a numpy
# uint32 array); they only build arrays and their bytes. Anything else a checkpoint names is refused.
def _legacy_numpy_globals() -> list:
    import numpy

    names = []
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        module = _try_import(module_name)
        if module is not None and hasattr(module, "_reconstruct"):
            names.append(module._reconstruct)
    names += [numpy.ndarray, numpy.dtype, codecs.encode]  # encode: an array's bytes (torch >= 2.5 allows it already)
    dtypes = _try_import("numpy.dtypes")
    if dtypes is not None and hasattr(dtypes, "UInt32DType"):
        names.append(dtypes.UInt32DType)
    return names


@contextlib.contextmanager
def _globals_allowed(extra: list):
    """``torch.load(weights_only=True)`` allowing ``extra`` too, for the calls inside only: torch's
    ``safe_globals`` context (torch >= 2.5), or on torch 2.4, which lacks it, its process-wide list
    extended and put back afterwards."""
    import torch

    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals(extra):
            yield
        return
    saved = list(serialization.get_safe_globals())
    serialization.add_safe_globals(extra)
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(saved)


def _try_import(name: str):
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _refusal(error: Exception) -> str:
    """The one-line reason of a ``weights_only`` refusal of a torch checkpoint (e.g. ``it names os.system``)."""
    import re

    text = " ".join(str(error).split())
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    what = f"it names {found.group(1)}" if found else "it needs more than tensors and plain data"
    return (f"{what}, which a tnas checkpoint never holds; refusing to load it (tnas only loads tensors "
            f"and plain data, so a checkpoint cannot run code)")


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format; its older one is a pickle, which starts with PROTO (0x80)


def _not_a_checkpoint(path: Path, error: Exception) -> Optional[str]:
    """Why ``path`` is no torch checkpoint at all, given how ``torch.load`` failed on it; None when it may
    be one that is damaged (a zip file, or a pickle that failed for another reason).

    A file torch never wrote (JSON, text, random bytes) reaches the pickle reader, which fails on its
    first byte with "Unsupported operand <byte>" -- no disallowed global, so no refusal to report."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return None
    if not head:
        return "it is empty, not a torch checkpoint"
    operand = "Unsupported operand" in str(error) and "Unsupported global" not in str(error)
    if head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80" and not operand):
        return None
    hint = "; it looks like JSON: a genotype file goes to --genotype" if head.lstrip()[:1] in (b"{", b"[") else ""
    return f"it is not a torch checkpoint (a file written by torch.save){hint}"


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Only tensors, plain containers and scalars (and the numpy arrays of older RNG states) are
    accepted, so a crafted file cannot run code: a checkpoint that names anything else is
    refused with one :class:`TnasError` line naming the file. A file that is no torch checkpoint
    at all (a genotype's JSON, say) is one line that says so.
    """
    import pickle
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise TnasError(f"checkpoint not found: {path}")
    try:
        with _globals_allowed(_legacy_numpy_globals()), warnings.catch_warnings():
            # a plain pickle that is not torch's makes torch warn about its protocol before it fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        reason = _not_a_checkpoint(path, error)
        if reason is None and isinstance(error, pickle.UnpicklingError) and (
                "weights only" in str(error).lower() or "Unsupported" in str(error)):
            reason = _refusal(error)
        if reason is None:
            reason = " ".join(str(error).split()) or type(error).__name__
        raise TnasError(f"cannot read checkpoint {path}: {reason}") from None
    if not isinstance(state, dict):
        raise TnasError(
            f"cannot read checkpoint {path}: expected a dict, found {type(state).__name__}"
        )
    return state


def figure_to_array(figure) -> np.ndarray:
    """Render a matplotlib figure to an RGB uint8 array [H, W, 3] with the Agg canvas.

    Works for ``matplotlib.figure.Figure`` objects and pyplot figures alike, without
    changing the global backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _close_figure(figure) -> None:
    """Release a figure; pyplot keeps a reference to its own figures until closed."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)


def render_heatmap(
    matrix,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> np.ndarray:
    """Draw a 2-D matrix (e.g. softmax(alpha), 14 edges x 8 ops) as an annotated heatmap.

    Returns the RGB uint8 image [H, W, 3]. Cells are annotated with their values when the
    matrix is small enough to read (at most 32 x 16).
    """
    from matplotlib.figure import Figure

    values = _to_numpy(matrix).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {values.shape}")
    rows, cols = values.shape
    figure = Figure(figsize=(1.2 + 0.9 * max(cols, 2), 1.0 + 0.4 * max(rows, 2)), dpi=80)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(cols))
    axes.set_yticks(range(rows))
    if col_labels is not None:
        axes.set_xticklabels(list(col_labels), rotation=45, ha="right", fontsize=8)
    if row_labels is not None:
        axes.set_yticklabels(list(row_labels), fontsize=8)
    if rows <= 32 and cols <= 16 and np.isfinite(values).all():
        middle = (values.max() + values.min()) / 2
        for r in range(rows):
            for c in range(cols):
                colour = "black" if values[r, c] > middle else "white"
                axes.text(c, r, f"{values[r, c]:.2f}", ha="center", va="center",
                          fontsize=6, color=colour)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    return figure_to_array(figure)


def _to_numpy(value) -> np.ndarray:
    """Turn a tensor (any device, with or without grad) or array-like into a numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _image_to_uint8_hwc(image) -> np.ndarray:
    """HWC (or HW) uint8 stays; floats are taken as [0, 1], clipped and scaled to uint8."""
    array = _to_numpy(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HWC with 1, 3 or 4 channels, got shape {array.shape}")
    if array.dtype != np.uint8:
        array = np.clip(np.nan_to_num(array.astype(np.float64)), 0.0, 1.0)
        array = np.round(array * 255.0).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return array


EVENT_FILE_PATTERN = "events.out.tfevents.*"


def _event_records(handle: IO[bytes]) -> Iterator[tuple]:
    """``(end offset, payload)`` of each TFRecord of an open event file (u64 length, u32 crc, payload,
    u32 crc), in order; stops at a truncated record (a write cut short by a kill) and at a length
    the rest of the file cannot hold (bytes that are no event file)."""
    import struct

    size = os.fstat(handle.fileno()).st_size
    position = 0
    while True:
        header = handle.read(12)
        if len(header) < 12:
            return
        (length,) = struct.unpack("<Q", header[:8])
        if length > size - position - 16:
            return
        payload = handle.read(length)
        if len(payload) < length or len(handle.read(4)) < 4:
            return
        position += 12 + length + 4
        yield position, payload


class RunLogger:
    """Log lines to ``<out_dir>/log.txt`` (+ stdout) and tensorboard events to ``<out_dir>/tb``.

    ``append=True`` continues an existing ``log.txt`` when a run resumes. The tensorboard
    writer is created on the first scalar/text/image call, so runs that log none leave no
    ``tb`` directory; with ``use_tensorboard=False`` those calls do nothing.

    A resumed run replays the iterations after its checkpoint, and would log their points a
    second time. So each checkpoint puts a marker event into the event stream
    (:meth:`mark_checkpoint`, its token saved in the checkpoint), and a resume cuts the event
    files back to that marker (:meth:`rewind_tensorboard`): every tag, on the iteration axis
    (``meta_train/``) and on the epoch axis (``epoch/``, pictures) alike, keeps exactly what was
    logged before the checkpoint. (tensorboard's own ``purge_step`` cannot do this: it drops the
    steps from one number on for every tag, and the epoch axis is not the iteration axis.)
    """

    def __init__(self, out_dir, use_tensorboard: bool = True, quiet: bool = False,
                 append: bool = False, on_close: Optional[Callable[[], None]] = None):
        """``on_close``: called once when the log is closed (a run releases its run directory then)."""
        self.out_dir = Path(out_dir)
        self._on_close = on_close
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.use_tensorboard = use_tensorboard
        self.quiet = quiet
        self.log_path = self.out_dir / "log.txt"
        self._log_file = open(self.log_path, "a" if append else "w", encoding="utf-8",
                              buffering=1)
        self._writer = None
        self._event_pb2 = None  # the protobuf module of the writer's package (markers)

    @property
    def tb_dir(self) -> Path:
        return self.out_dir / "tb"

    @property
    def writer(self):
        """The tensorboard ``SummaryWriter`` (created on first access), or None when disabled.

        tensorboardX (a dependency) when importable; otherwise torch's own writer, which needs
        the ``tensorboard`` package (e.g. on GPU images that ship it but not tensorboardX);
        with neither, tensorboard logging is off and a line in log.txt says so.
        """
        if not self.use_tensorboard:
            return None
        if self._writer is None:
            try:
                from tensorboardX import SummaryWriter
                from tensorboardX.proto import event_pb2
            except ImportError:
                try:
                    from tensorboard.compat.proto import event_pb2
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    self.use_tensorboard = False
                    self.log("tensorboard logging off: neither tensorboardX nor tensorboard is installed")
                    return None
            # tensorboardX names a file by the second it opens it, and a second writer in the same
            # second (a quick resume) would overwrite the first one's file: a suffix of its own, which
            # also keeps the files in the order they were begun (tensorboard reads them in name order)
            self._writer = SummaryWriter(str(self.tb_dir), filename_suffix=f".{time.time_ns()}.{os.getpid()}")
            self._event_pb2 = event_pb2
        return self._writer

    def _event_files(self) -> list:
        return sorted(self.tb_dir.rglob(EVENT_FILE_PATTERN)) if self.tb_dir.is_dir() else []

    def mark_checkpoint(self, step: int) -> Optional[dict]:
        """Put a checkpoint marker into the tensorboard stream, after everything logged so far, and
        return what the checkpoint keeps for :meth:`rewind_tensorboard`: ``{"marker": token, "files":
        [event files under tb/ now, relative]}``; None when tensorboard logging is off.

        The marker is an ``Event`` (at ``step``) whose ``SessionLog`` has status CHECKPOINT and the
        token as ``checkpoint_path``; tensorboard shows nothing for it. The writer queues events and
        writes them from a thread of its own, so the token marks the checkpoint's place in the stream
        where byte offsets taken now could not."""
        import uuid

        writer = self.writer
        if writer is None:
            return None
        token = f"tnas-checkpoint-{uuid.uuid4().hex}"
        pb2 = self._event_pb2
        writer._get_file_writer().add_event(pb2.Event(step=int(step), session_log=pb2.SessionLog(
            status=pb2.SessionLog.CHECKPOINT, checkpoint_path=token)))
        return {"marker": token, "files": [path.relative_to(self.tb_dir).as_posix() for path in self._event_files()]}

    def rewind_tensorboard(self, mark: Optional[Mapping[str, object]]) -> Optional[str]:
        """Cut the tensorboard events back to a checkpoint's ``mark`` (:meth:`mark_checkpoint`), before
        this logger writes any: the file holding the marker ends after it, event files that did not
        exist at the checkpoint (a killed run's later ones, a finished run's hparams sub-run) are
        removed, the others kept. Returns a line saying what was dropped (None: nothing; also for a
        checkpoint without a mark, or with tensorboard off). A marker lost with a killed process's
        unwritten events leaves its file whole: the writer writes in order, so nothing after the
        marker reached the file either."""
        if not mark or not self.use_tensorboard:
            return None
        if self._writer is not None:
            raise RuntimeError("rewind_tensorboard must run before this logger writes tensorboard events")
        token, kept = str(mark["marker"]).encode(), set(mark.get("files") or [])
        cut = removed = 0
        for path in self._event_files():
            end = None
            try:
                with open(path, "rb") as handle:
                    for position, payload in _event_records(handle):
                        if token in payload:
                            end = position
                            break
            except OSError:  # not a readable file (a directory of that name): not ours to touch
                continue
            if end is not None:
                if path.stat().st_size > end:
                    os.truncate(path, end)
                    cut += 1
            elif path.relative_to(self.tb_dir).as_posix() not in kept:
                path.unlink()
                removed += 1
        if not (cut or removed):
            return None
        return (f"tensorboard: dropped the events logged after the checkpoint ({cut} file(s) cut back to it, "
                f"{removed} later file(s) removed)")

    def log(self, message: str, echo: bool = True) -> None:
        """Write a timestamped line to log.txt, and to stdout unless quiet (or ``echo`` is False)."""
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.write(line + "\n")
        if echo and not self.quiet:
            from tqdm import tqdm

            tqdm.write(line)

    def scalar(self, tag: str, value, step: int) -> None:
        """Add one scalar; ``value`` may be a 0-d tensor (one host sync, so log sparingly)."""
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), int(step))

    def scalars(self, mapping: Mapping[str, object], step: int, prefix: str = "") -> None:
        """Add each ``name: value`` as scalar ``prefix/name`` (``prefix`` may end in '/')."""
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        for name, value in mapping.items():
            self.scalar(f"{prefix}{name}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Add a text entry (shown in tensorboard's Text tab)."""
        if self.writer is not None:
            self.writer.add_text(tag, str(text), int(step))

    def image(self, tag: str, image, step: int) -> None:
        """Add an HWC image: uint8 as is, floats in [0, 1]; HW grayscale is accepted."""
        if self.writer is not None:
            self.writer.add_image(tag, _image_to_uint8_hwc(image), int(step), dataformats="HWC")

    def figure(self, tag: str, figure, step: int) -> None:
        """Render a matplotlib figure to an image, add it, and close the figure."""
        try:
            if self.writer is not None:
                self.image(tag, figure_to_array(figure), step)
        finally:
            _close_figure(figure)

    def heatmap(self, tag: str, matrix, step: int, row_labels=None, col_labels=None,
                title: str | None = None) -> None:
        """Add a heatmap of a 2-D matrix, e.g. softmax(alpha) as [14 edges x 8 ops]."""
        if self.writer is not None:
            self.image(tag, render_heatmap(matrix, row_labels, col_labels, title), step)

    def flush(self) -> None:
        """Push buffered log lines and tensorboard events to disk."""
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.flush()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Close log.txt and the tensorboard writer; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._log_file is not None and not self._log_file.closed:
            self._log_file.close()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress(iterable=None, total=None, desc=None, disable=None, **kw):
    """A tqdm progress bar with our defaults (``leave=False``).

    With ``disable=None`` the bar is off when ``TNAS_PROGRESS=0``, forced on when
    ``TNAS_PROGRESS=1``, and otherwise shown only when stderr is a terminal (so logs of
    batch jobs stay clean).
    """
    from tqdm import tqdm

    if disable is None:
        setting = os.environ.get("TNAS_PROGRESS", "").strip()
        if setting == "0":
            disable = True
        elif setting == "1":
            disable = False
        else:
            disable = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    kw.setdefault("leave", False)
    kw.setdefault("dynamic_ncols", True)
    return tqdm(iterable, total=total, desc=desc, disable=disable, **kw)
