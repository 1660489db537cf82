"""Loading the pickle files that datasets ship in, without running arbitrary code.

mini-ImageNet, tieredImageNet and CIFAR-100 are distributed as pickles of dicts, lists and
numpy arrays. A plain ``pickle.load`` would execute whatever a crafted file asks for, so we
unpickle with an explicit allow-list of the few (module, name) pairs those files need (numpy
array reconstruction, dtypes, and a handful of builtins); a module outside it is never imported. Python 2 pickles (CIFAR-100, the original tieredImageNet
labels) are read with ``encoding="bytes"`` fallback; dict keys that are bytes are turned into str.
"""
from __future__ import annotations

import io
import pickle
from typing import Any

from tnas.errors import TnasError

__all__ = ["load_pickle", "normalise_keys"]

# Exactly these (module, name) pairs may be named by a dataset pickle; nothing is allowed by
# prefix, since importing a module can itself run code (``numpy.f2py.__main__`` runs f2py).
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "ndarray"),
    ("numpy._core.multiarray", "ndarray"),
    ("numpy.core.multiarray", "dtype"),
    ("numpy._core.multiarray", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "tuple"),
    ("builtins", "bytearray"),
    ("builtins", "bytes"),
    ("builtins", "str"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("_codecs", "encode"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("__builtin__", "object"),
    ("builtins", "object"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":
            module = "builtins"
        if module == "copy_reg":
            module = "copyreg"
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise TnasError(f"{self._path}: the pickle asks for {module}.{name}, which a dataset file should not "
                        f"contain; refusing to load it")


def load_pickle(path: str) -> Any:
    """Load a dataset pickle with the allow-list above; Python 2 pickles are supported."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise TnasError(f"cannot read {path}: {error.strerror or error}") from None
    last_error: Exception | None = None
    for encoding in ("ASCII", "bytes"):
        try:
            return _RestrictedUnpickler(io.BytesIO(data), path, encoding=encoding).load()
        except TnasError:
            raise
        except UnicodeDecodeError as error:  # a Python 2 pickle holding binary str
            last_error = error
        except Exception as error:  # truncated or not a pickle at all
            last_error = error
            break
    raise TnasError(f"{path}: not a readable pickle ({type(last_error).__name__}: {last_error})")


def normalise_keys(obj: Any) -> Any:
    """Turn bytes dict keys (Python 2 pickles read with encoding='bytes') into str, one level deep."""
    if isinstance(obj, dict):
        return {(key.decode("latin1") if isinstance(key, bytes) else key): value for key, value in obj.items()}
    return obj
