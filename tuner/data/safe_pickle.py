"""A restricted unpickler for the benchmarks' ``.pkl`` and ``allow_pickle`` ``.npy`` files.

The released benchmark files (DBL's ``class_split.pkl`` / ``class_freq.pkl``, CoNeS's
``voc07_*.npy``) are pickles. ``pickle.load`` or ``np.load(..., allow_pickle=True)`` on such a
file runs whatever callable the file names, so these files are read only through
:class:`RestrictedUnpickler`: it builds plain containers (dict, list, tuple, set, frozenset,
str, bytes, numbers) and NumPy arrays / dtypes / scalars, and refuses every other global with a
:class:`~tuner.errors.DataError` naming it, before anything is called.

Allowed globals (what NumPy's own pickles and Python 2 protocol-2 pickles need):

* ``builtins``/``__builtin__``: ``set``, ``frozenset``, ``list``, ``dict``, ``tuple``,
  ``bytes``, ``bytearray``, ``int``, ``float``, ``complex``, ``bool``, ``str``, ``slice``,
  ``range``;
* ``collections.OrderedDict``;
* ``_codecs.encode`` restricted to the ``latin1`` encoding (protocol-2 pickles spell bytes
  as ``_codecs.encode(text, "latin1")``);
* ``numpy.ndarray``, ``numpy.dtype``, ``numpy.core.multiarray._reconstruct`` /
  ``scalar`` (and their ``numpy._core`` spellings in NumPy 2), ``numpy.dtypes.*DType``.
"""

from __future__ import annotations

import _codecs
import builtins
import collections
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from tuner.errors import DataError

_BUILTINS = frozenset(
    {"set", "frozenset", "list", "dict", "tuple", "bytes", "bytearray", "int", "float",
     "complex", "bool", "str", "slice", "range"}
)
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")


def _multiarray() -> Any:
    """NumPy's ``multiarray`` module (``numpy._core`` in NumPy 2, ``numpy.core`` before)."""
    import importlib

    try:
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:  # NumPy 1.x
        return importlib.import_module("numpy.core.multiarray")


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` for the one use protocol-2 pickles make of it (str -> latin1 bytes)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise DataError(f"pickle asks for _codecs.encode with encoding {encoding!r}; refused")
    return _codecs.encode(text, encoding, errors)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only plain containers and NumPy array globals."""

    source = "<bytes>"

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return getattr(builtins, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in _NUMPY_CORE and name in ("_reconstruct", "scalar"):
            return getattr(_multiarray(), name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(np.dtypes, name)
        raise DataError(
            f"{self.source} is a pickle that needs {module}.{name}, which could run code; "
            f"refused (only plain containers and NumPy arrays are loaded)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source} uses pickle persistent ids; refused")


def loads(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``source`` names it in errors)."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding="latin1")
    unpickler.source = source
    try:
        return unpickler.load()
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: one line naming the file
        raise DataError(f"{source} is not a readable pickle ({type(exc).__name__}: {exc})") from exc


def load_pickle(path: str | Path) -> Any:
    """Load a ``.pkl`` file through the restricted unpickler."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror})") from exc
    return loads(data, str(path))


def load_npy(path: str | Path) -> Any:
    """Load a ``.npy`` file; object arrays (``allow_pickle``) go through the restricted unpickler.

    A 0-d object array (how ``np.save`` stores a dict) is unwrapped to the object it holds.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                _, _, dtype = npy_format.read_array_header_1_0(fh)
            else:
                _, _, dtype = npy_format.read_array_header_2_0(fh)
            if not dtype.hasobject:
                fh.seek(0)
                return np.load(fh, allow_pickle=False)
            data = fh.read()
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable .npy file ({exc})") from exc
    array = loads(data, str(path))
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path} holds a pickled {type(array).__name__}, not an array")
    return array.item() if array.shape == () else array
