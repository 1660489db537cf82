"""Files a later stage reads, written so that a crash or a full disk never leaves half of one.

The bytes go to a temporary file in the same directory, are fsynced, and then ``os.replace``
swaps it in (and the directory is fsynced, where the OS allows, so the rename itself lasts);
a failed write is one :class:`~tnas.errors.TnasError` line that keeps the previous file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

from tnas.errors import TnasError

NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)
"""What ``np.load`` raises on an ``.npz`` that cannot be read back: a damaged archive fails as BadZipFile
(bad CRC, truncated), EOFError or zlib.error, none of them an OSError or ValueError."""

_PARENT_ONLY: "weakref.WeakSet[IO[Any]]" = weakref.WeakSet()


def keep_from_forked_children(handle: IO[Any]) -> IO[Any]:
    """Mark ``handle`` (an open file holding an ``fcntl.flock``) as this process's alone: a child forked
    later (a decoding worker of concurrent.futures) closes its copy at once; returns ``handle``.

    A flock belongs to the open file, which a fork shares, and is held while any copy is open. The
    decoding workers of a run killed outright wait for work forever, so their copies kept its ``--out``
    lock (every rerun refused, naming the dead pid) or a cache entry's build lock (the next build
    waited forever). Closing a copy does not unlock the parent's."""
    _PARENT_ONLY.add(handle)
    return handle


def _close_parent_only_files() -> None:
    for handle in list(_PARENT_ONLY):
        with contextlib.suppress(OSError, ValueError):
            handle.close()
    _PARENT_ONLY.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_parent_only_files)

# Temp files are created 0600; give the final file the usual permissions (0666 & ~umask).
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_file(path, what: str = "") -> Iterator[IO[bytes]]:
    """Yield a binary temp file beside ``path``; on success fsync it and move it onto ``path``.

    On any exception the temp file is removed and ``path`` is left as it was; an ``OSError`` (a full
    disk, no permission) comes out as one :class:`TnasError` line, ``cannot write <what><path>: ...``.
    """
    try:
        with _replaced_on_success(Path(path)) as handle:
            yield handle
    except OSError as error:
        kept = "the previous one is kept" if Path(path).exists() else "nothing was written"
        raise TnasError(f"cannot write {what}{path}: {error.strerror or error}; {kept}") from None


@contextlib.contextmanager
def _replaced_on_success(path: Path) -> Iterator[IO[bytes]]:
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
    fsync_directory(path.parent)


def fsync_directory(directory) -> None:
    """fsync a directory, which persists a rename or a new file in it (best effort: not every OS or
    filesystem allows it)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, os.replace); a failed
    write (full disk, no permission) is one :class:`TnasError` line and keeps the previous file."""
    with atomic_file(path) as handle:
        handle.write(data)


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
