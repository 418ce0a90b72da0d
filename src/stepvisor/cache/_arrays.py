"""NumPy values for the value digest, imported only when a value's type comes from NumPy.

An array's digest covers its type (``ndarray``, or the subclass with its instance state),
its dtype, its shape and its content in C order, so equal content gives equal digests
whatever the memory layout: a Fortran-ordered array, a strided view and a C-contiguous
copy of the same values digest alike.  A C-contiguous array is read in place (BLAKE3 over
the buffer, no copy); another layout is copied to C order a 16 MB slab at a time.

Bytes are read only where they are the content: object arrays are read item by item (their
bytes are pointers), structured arrays field by field (the padding between fields holds
whatever was in memory).  ``np.memmap`` is read like the array it maps.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

import numpy as np

if TYPE_CHECKING:
    from stepvisor.cache._digest import _Encoder

__all__ = ["encode_numpy"]

#: How many bytes of a strided array are copied to C order at a time.
_SLAB: Final = 16 << 20


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
    elif array.flags.c_contiguous or array.ndim == 0:
        flat = np.ascontiguousarray(array).reshape(-1)
        encoder.blob(b"r", flat.view(np.uint8).data)
    else:
        encoder.stream(b"r", array.nbytes, _c_order_slices(array))


def _c_order_slices(array: np.ndarray[Any, Any]) -> Iterator[memoryview]:
    """The bytes of ``array`` in C order, copied a slab of the first axis at a time.

    The C order of an array is the C order of its slabs ``array[i:j]``, one after the
    other; each slab is about :data:`_SLAB` bytes, so a strided 200 MB view never costs a
    200 MB copy.
    """
    row = max(1, array.nbytes // max(1, array.shape[0]))
    step = max(1, _SLAB // row)
    for start in range(0, array.shape[0], step):
        slab = np.ascontiguousarray(array[start : start + step]).reshape(-1)
        yield slab.view(np.uint8).data
