"""The log of a run: timestamped lines in ``<run>/log.txt`` and tensorboard events in ``<run>/tb``.

:class:`RunLogger` writes lines to ``log.txt`` (and stdout, through ``tqdm.write`` so progress
bars survive) and scalars, text, images and heatmaps to tensorboard events (tensorboardX, created
on first use), and cuts the events back to a checkpoint's marker when a run resumes. The files a
later stage reads are written by :mod:`tnas.files`, checkpoints by :mod:`tnas.checkpoints`.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Callable, Iterator, Mapping, Optional

import numpy as np

from tnas.visualize import figure_to_array, render_heatmap


def _close_figure(figure) -> None:
    """Release a figure; pyplot keeps a reference to its own figures until closed."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        pyplot.close(figure)


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


def remove_event_files(tb_dir) -> int:
    """Delete the tensorboard event files under ``tb_dir`` (recursively; sub-runs too); returns how many.

    For a run that starts afresh in a directory whose earlier attempt was killed before its first
    checkpoint: that attempt's points would otherwise show beside the new run's, as :meth:`RunLogger.rewind_tensorboard`
    prevents for a resume."""
    removed = 0
    for path in sorted(Path(tb_dir).rglob(EVENT_FILE_PATTERN)) if Path(tb_dir).is_dir() else []:
        if path.is_file():
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass
    return removed


def _write_queued_events(writer) -> None:
    """Put every event queued so far into the event file (and flush it), now.

    A checkpoint needs this: a process killed outright (SIGKILL, the OOM killer) after saving it loses
    the events still queued, those logged before the checkpoint among them, and the resume does not log
    them again. tensorboardX's ``flush()`` flushes the file but not its queue, which a thread of its own
    empties (every ``flush_secs``, 120 s by default); so its thread is stopped -- it writes everything
    queued before the stop, in order -- and a new one started on the same queue and file. torch's writer
    (tensorboard's) empties its queue in ``flush()`` itself."""
    events = getattr(writer._get_file_writer(), "event_writer", None)
    worker = getattr(events, "_worker", None)
    if worker is not None and hasattr(worker, "stop") and hasattr(events, "_event_queue"):  # tensorboardX
        try:  # the successor first: a tensorboardX whose thread takes other arguments keeps its own thread
            successor = type(worker)(events._event_queue, events._ev_writer, events._flush_secs)
        except (TypeError, AttributeError):
            successor = None
        if successor is not None:
            worker.stop()
            events._worker = successor
            successor.start()
    writer.flush()


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
        where byte offsets taken now could not. The queue is flushed to the file here, before the
        checkpoint is saved, so the points up to the checkpoint outlive a SIGKILL."""
        import uuid

        writer = self.writer
        if writer is None:
            return None
        token = f"tnas-checkpoint-{uuid.uuid4().hex}"
        pb2 = self._event_pb2
        writer._get_file_writer().add_event(pb2.Event(step=int(step), session_log=pb2.SessionLog(
            status=pb2.SessionLog.CHECKPOINT, checkpoint_path=token)))
        _write_queued_events(writer)
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
