"""NumPy values for the value digest, imported only when a value's type comes from NumPy.

An array's digest covers its type (``ndarray``, or the subclass with its instance state),
its dtype, its shape and its content in C order, so equal content gives equal digests
whatever the memory layout: a Fortran-ordered array, a strided view and a C-contiguous
copy of the same values digest alike.  A C-contiguous array is read in place (BLAKE3 over
the buffer, no copy); another layout is copied to C order once.

Bytes are read only where they are the content: object arrays are read item by item (their
bytes are pointers), structured arrays field by field (the padding between fields holds
whatever was in memory).  ``np.memmap`` is read like the array it maps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from stepvisor.cache._digest import _Encoder

__all__ = ["encode_numpy"]


def encode_numpy(encoder: _Encoder, value: object, depth: int) -> None:
    """Encode a NumPy array, scalar or dtype; anything else from NumPy is unreadable."""
    if isinstance(value, np.ndarray):
        if type(value) is np.ndarray or isinstance(value, np.memmap):
            encoder.tag(b"A")
        else:
            _subclass_state(encoder, value, depth)
        _array(encoder, np.asarray(value), depth)
    elif isinstance(value, np.generic):
        encoder.tag(b"G")
        _array(encoder, np.asarray(value), depth)
    elif isinstance(value, np.dtype):
        encoder.tag(b"y")
        _dtype(encoder, value)
    else:
        raise encoder.fail(value)


def _subclass_state(encoder: _Encoder, value: np.ndarray[Any, Any], depth: int) -> None:
    """A subclass (a masked array, a matrix): its type name and its instance ``__dict__``."""
    kind = type(value)
    encoder.text(b"a", f"{kind.__module__}.{kind.__qualname__}")
    encoder.value(dict(getattr(value, "__dict__", {})), depth + 1)


def _dtype(encoder: _Encoder, dtype: np.dtype[Any]) -> None:
    # .str alone says "|V16" for every structured dtype; descr names the fields and
    # their types (and the padding), in a form that is the same in every process.
    encoder.text(b"d", dtype.str if dtype.names is None else repr(dtype.descr))


def _array(encoder: _Encoder, array: np.ndarray[Any, Any], depth: int) -> None:
    _dtype(encoder, array.dtype)
    encoder.count(array.ndim)
    for extent in array.shape:
        encoder.count(extent)
    if array.dtype.names is not None:
        for name in array.dtype.names:
            encoder.text(b"n", name)
            encoder.value(array[name], depth + 1)
    elif array.dtype.hasobject:
        encoder.items(b"o", array.ravel(order="C").tolist(), depth + 1)
    else:
        flat = np.ascontiguousarray(array).reshape(-1)
        encoder.blob(b"r", flat.view(np.uint8).data)
