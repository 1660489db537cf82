"""Checkpoints that are safe to share: written atomically, loaded without running code.

:func:`save_checkpoint` writes through :func:`tnas.files.atomic_file`. :func:`load_checkpoint`
reads with ``torch.load(weights_only=True)`` and an explicit allow-list (the numpy types of older
RNG states only), so a crafted file is refused with one line naming what it asked for;
:func:`read_checkpoint` does the same and also returns the SHA-256 of the very bytes it loaded.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
from pathlib import Path
from typing import Optional, Tuple

from tnas.errors import TnasError
from tnas.files import atomic_file


def save_checkpoint(state: dict, path) -> None:
    """``torch.save`` ``state`` to ``path`` atomically: readers never see a half-written file.

    ``state`` must hold only what :func:`load_checkpoint` accepts (tensors, plain Python
    containers and scalars, torch dtypes). A failed write (full disk, say) is one
    :class:`TnasError` line; the previous file under ``path`` is kept and no temp file is left.
    """
    import torch

    with atomic_file(path, "checkpoint ") as handle:
        torch.save(state, handle)


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


def _not_a_checkpoint(head: bytes, error: Exception) -> Optional[str]:
    """Why ``path`` is no torch checkpoint at all, given how ``torch.load`` failed on it; None when it may
    be one that is damaged (a zip file, or a pickle that failed for another reason).

    A file torch never wrote (JSON, text, random bytes) reaches the pickle reader, which fails on its
    first byte with "Unsupported operand <byte>" -- no disallowed global, so no refusal to report."""
    if not head:
        return "it is empty, not a torch checkpoint"
    operand = "Unsupported operand" in str(error) and "Unsupported global" not in str(error)
    if head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80" and not operand):
        return None
    hint = "; it looks like JSON: a genotype file goes to --genotype" if head.lstrip()[:1] in (b"{", b"[") else ""
    return f"it is not a torch checkpoint (a file written by torch.save){hint}"


def _damaged_record(data: bytes) -> Optional[str]:
    """The name of the first record of a torch zip checkpoint whose bytes no longer match the CRC-32
    ``torch.save`` stored for it, else None. ``torch.load`` does not check these, so a file damaged
    after it was written (a bad copy or disk) would load with wrong weights and no error. A record with
    CRC 0 is not checked: ``torch.save`` under ``set_crc32_options(False)`` stores 0 for every record.
    A file zipfile cannot open at all (a truncated one), and a record it cannot read back (compressed with
    a method it lacks, or encrypted: a zip torch.save never writes), are left to ``torch.load``'s own error."""
    import io
    import zipfile

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not readable as a zip: torch.load says why
        return None
    with archive:
        for info in archive.infolist():
            if info.CRC == 0:
                continue
            try:
                with archive.open(info) as member:  # reading to the end checks the CRC-32
                    while member.read(1 << 20):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError, ValueError):
                return info.filename
            except (NotImplementedError, RuntimeError):  # an unknown compression method; an encrypted record
                continue
    return None


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    Only tensors, plain containers and scalars (and the numpy arrays of older RNG states) are
    accepted, so a crafted file cannot run code: a checkpoint that names anything else is
    refused with one :class:`TnasError` line naming the file. A file that is no torch checkpoint
    at all (a genotype's JSON, say) is one line that says so, and so is one whose bytes changed
    after it was saved (its records' CRC-32s, which torch.load does not check, are).
    """
    return read_checkpoint(path, map_location)[0]


def read_checkpoint(path, map_location="cpu") -> Tuple[dict, str]:
    """:func:`load_checkpoint`'s state and the SHA-256 of the bytes it came from. The file is read
    once, so the hash names exactly the weights loaded, even while a run replaces the file (a
    training still saving its ``best.pt``)."""
    import io
    import pickle
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise TnasError(f"checkpoint not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TnasError(f"cannot read checkpoint {path}: {error.strerror or error}") from None
    damaged = _damaged_record(data) if data.startswith(_ZIP_MAGIC) else None
    if damaged is not None:
        raise TnasError(f"cannot read checkpoint {path}: it is damaged (its record {damaged} no longer matches "
                        f"the checksum torch.save wrote; the file changed after it was saved: copy it again)")
    try:
        with _globals_allowed(_legacy_numpy_globals()), warnings.catch_warnings():
            # a plain pickle that is not torch's makes torch warn about its protocol before it fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        reason = _not_a_checkpoint(data[:64], error)
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
    return state, hashlib.sha256(data).hexdigest()
