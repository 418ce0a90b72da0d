"""Content digests of values: the parameter and input parts of a cache key.

A cache key must change whenever what a step computes could change, and it must be the
same in every process that sees equal values, so the digest is taken over a canonical
encoding of the value's *content*, never over ``hash()`` (salted per process for str),
``id()``, ``repr()`` of arbitrary objects (memory addresses) or set iteration order::

    value ──> _Encoder.value: a type tag, then the content, length-prefixed ──> BLAKE3 ──> hex
                 containers: their items, in order (sets: the sorted digests of the items)
                 NumPy arrays: dtype, shape, then the bytes in C order (no copy if C-contiguous)

A miss is safe (the step computes again); a wrong hit serves wrong data.  So every
encoding is injective (a tag per type, a length before every variable-sized part), and a
value whose content cannot be read deterministically raises :class:`UnhashableValue`
rather than being digested by a part of it.  What is read:

* ``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``, ``bytearray``,
  ``memoryview`` (its bytes), ``Ellipsis``;
* ``tuple``, ``list``, ``dict`` (in insertion order: ``{a, b}`` and ``{b, a}`` differ, a
  safe miss), ``set`` and ``frozenset`` (order-free); subclasses of these and of the
  scalars with their type name and their instance ``__dict__`` (a NamedTuple, an
  OrderedDict, a Counter, a str subclass);
* enum members (type, name, value), dataclass instances (type, fields, other instance
  attributes), a defaultdict's factory, paths, dates,
  times, timedeltas (tz: none, fixed offset or an IANA zone), ``Decimal``, ``Fraction``,
  ``UUID``;
* functions, classes, bound methods and partials: their
  :func:`~stepvisor.cache._code.code_digest`;
* NumPy arrays and scalars by dtype, shape and bytes: equal content gives equal digests
  whatever the memory order (Fortran, strided views); object arrays item by item;
  structured arrays field by field (their padding bytes are never read).  NumPy is
  imported only when a value's type comes from it.

Everything else (open files, locks, sockets, generators, arbitrary objects) raises
:class:`UnhashableValue`, whose message names what the value is.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import io
import reprlib
import struct
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from stepvisor.errors import StepvisorError

__all__ = ["DIGEST_SCHEME", "UnhashableValue", "new_hasher", "value_digest"]


def _load_blake3() -> Any:
    """BLAKE3's constructor, or None if the blake3 wheel is missing (then SHA-256)."""
    try:
        import blake3  # noqa: PLC0415 - optional at import so a broken install still runs
    except ImportError:  # pragma: no cover - blake3 is a dependency
        return None
    return blake3.blake3


_blake3: Final = _load_blake3()

#: Names the hash function and this encoding.  It is the first thing every digest covers,
#: so that a change of either can never make an old digest match a new one.
DIGEST_SCHEME: Final = "stepvisor-digest/1/" + ("blake3" if _blake3 is not None else "sha256")

#: Buffers at least this large go to the hash function directly instead of being copied
#: into the pending small-token buffer first.
_BIG: Final = 1 << 16
_DEPTH_LIMIT: Final = 200


class _Hasher(Protocol):
    """The slice of a hashlib-like object the encoders use."""

    def update(self, data: Any, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hasher() -> _Hasher:
    """A fresh hash object of :data:`DIGEST_SCHEME`, already fed the scheme's name.

    BLAKE3: a cryptographic hash (a collision is as unlikely as with SHA-256) that reads a
    large buffer about eight times faster than the MD5 ``joblib.hash`` uses, on one thread.
    """
    hasher: Any = _blake3() if _blake3 is not None else hashlib.sha256()
    hasher.update(DIGEST_SCHEME.encode())
    return hasher  # type: ignore[no-any-return]


class UnhashableValue(StepvisorError):  # noqa: N818 - the name is the cache's interface
    """A value the cache cannot digest: the step computes, and its note says why.

    ``str(exc)`` reads after "input 'f' is", e.g. ``an open file (_io.TextIOWrapper)`` or
    ``a lock (_thread.lock) at ['locks'][0]``.  ``what`` is that description without the
    place, ``where`` the place inside the value (``""`` for the value itself).
    """

    def __init__(self, what: str, where: str = "") -> None:
        self.what = what
        self.where = where
        super().__init__(f"{what} at {where}" if where else what)


def value_digest(value: object) -> str:
    """Hex digest of ``value``'s content (see the module docstring for what is read).

    Raises :class:`UnhashableValue` for open files, locks, sockets, generators and any
    value whose content cannot be read deterministically.
    """
    return _digest_sized(value)[0]


def _digest_sized(value: object) -> tuple[str, int]:
    """The digest and how many bytes were hashed (the code digest re-checks small values)."""
    encoder = _Encoder()
    try:
        encoder.value(value, 0)
    except RecursionError as exc:
        raise UnhashableValue(f"a value nested too deeply ({_type_name(value)})") from exc
    return encoder.finish()


def _type_name(value: object) -> str:
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _kind_of_unreadable(value: object) -> str:
    """What ``value`` is, in words, for the message of an :class:`UnhashableValue`."""
    name = _type_name(value)
    mro = {f"{c.__module__}.{c.__qualname__}" for c in type(value).__mro__}
    if isinstance(value, io.IOBase) or "tempfile._TemporaryFileWrapper" in mro:
        return f"an open file ({name})"
    if "socket.socket" in mro:
        return f"a socket ({name})"
    if mro & {"_thread.lock", "_thread.RLock", "threading.Condition", "threading.Semaphore"}:
        return f"a lock ({name})"
    if isinstance(value, types.GeneratorType | types.AsyncGeneratorType | types.CoroutineType):
        return f"a generator or coroutine ({name}): its items can be read only once"
    if hasattr(type(value), "__next__"):
        return f"an iterator ({name}): its items can be read only once"
    return (
        f"a {name}, whose content the cache cannot read deterministically (it reads plain "
        "data, containers of it, enums, dataclasses, paths, dates and NumPy arrays)"
    )


class _Name(str):
    """An attribute name in a path: shown as is, not quoted."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class _Encoder:
    """Writes the canonical encoding of values into one hash object.

    Small tokens gather in a bytearray and go to the hash in one call; large buffers go
    directly, so a 200 MB array is read once and never copied (if C-contiguous).
    """

    __slots__ = ("_active", "_hasher", "_pending", "_size", "_where")

    def __init__(self) -> None:
        self._hasher = new_hasher()
        self._pending = bytearray()
        self._size = 0
        # The path to the part being encoded, as (format, key) pairs: formatted only
        # when a part is refused, so a large dict does not pay a repr() per key.
        self._where: list[tuple[str, object]] = []
        self._active: set[int] = set()  # ids of the containers being encoded (cycles)

    def finish(self) -> tuple[str, int]:
        self._flush()
        return self._hasher.hexdigest(), self._size

    def _flush(self) -> None:
        if self._pending:
            self._hasher.update(self._pending)
            self._size += len(self._pending)
            self._pending = bytearray()

    def tag(self, tag: bytes) -> None:
        self._pending += tag

    def count(self, n: int) -> None:
        self._pending += n.to_bytes(8, "little")

    def blob(self, tag: bytes, data: bytes | bytearray | memoryview) -> None:
        """A tag, the length, the bytes."""
        self._pending += tag
        self._pending += len(data).to_bytes(8, "little")
        if len(data) < _BIG:
            self._pending += data
        else:
            self._flush()
            self._hasher.update(data)
            self._size += len(data)

    def stream(self, tag: bytes, total: int, chunks: Iterable[memoryview]) -> None:
        """As :meth:`blob` of the concatenated ``chunks`` (``total`` bytes in all), without
        ever holding them together: a strided array is copied a slice at a time."""
        self._pending += tag
        self._pending += total.to_bytes(8, "little")
        self._flush()
        seen = 0
        for chunk in chunks:
            self._hasher.update(chunk)
            seen += len(chunk)
        if seen != total:  # pragma: no cover - a bug in the caller, never a wrong digest
            raise RuntimeError(f"streamed {seen} bytes where {total} were announced")
        self._size += total

    def text(self, tag: bytes, text: str) -> None:
        self.blob(tag, text.encode("utf-8", "surrogatepass"))

    def fail(self, value: object, what: str | None = None) -> UnhashableValue:
        where = "".join(form.format(reprlib.repr(key)) for form, key in self._where)
        return UnhashableValue(what or _kind_of_unreadable(value), where)

    # -- dispatch ------------------------------------------------------------------------

    def value(self, value: object, depth: int) -> None:
        if depth > _DEPTH_LIMIT:
            raise self.fail(value, f"a value nested more than {_DEPTH_LIMIT} levels deep")
        kind = type(value)
        scalar = _SCALARS.get(kind)
        if scalar is not None:
            scalar(self, value)
            return
        module = kind.__module__
        if module == "numpy" or module.startswith("numpy."):
            from stepvisor.cache._arrays import encode_numpy  # noqa: PLC0415 - NumPy on demand

            encode_numpy(self, value, depth)
            return
        container = _CONTAINERS.get(kind)
        if container is not None:
            self._container(value, depth, container)
            return
        self._other(value, depth)

    def _container(
        self, value: Any, depth: int, encode: Callable[[_Encoder, Any, int], None]
    ) -> None:
        key = id(value)
        if key in self._active:
            raise self.fail(value, f"a {_type_name(value)} that contains itself")
        self._active.add(key)
        try:
            encode(self, value, depth + 1)
        finally:
            self._active.discard(key)

    def items(self, tag: bytes, values: Any, depth: int) -> None:
        self.tag(tag)
        self.count(len(values))
        scalars = _SCALARS
        for index, item in enumerate(values):
            scalar = scalars.get(type(item))
            if scalar is not None:  # the common case, which cannot fail: no path kept
                scalar(self, item)
                continue
            self._where.append(("[{}]", index))
            self.value(item, depth)
            self._where.pop()

    def mapping(self, tag: bytes, mapping: Any, depth: int) -> None:
        self.tag(tag)
        self.count(len(mapping))
        scalars = _SCALARS
        for key, item in dict.items(mapping):
            key_scalar = scalars.get(type(key))
            if key_scalar is not None:
                key_scalar(self, key)
            else:
                self._where.append(("[{}]", key))
                self.value(key, depth)
                self._where.pop()
            scalar = scalars.get(type(item))
            if scalar is not None:
                scalar(self, item)
                continue
            self._where.append(("[{}]", key))
            self.value(item, depth)
            self._where.pop()

    def unordered(self, tag: bytes, values: Any, depth: int) -> None:
        """A set: the sorted digests of its items, so that iteration order cannot matter."""
        digests = []
        for item in values:
            self._where.append(("{{{}}}", item))
            sub = _Encoder()
            sub._active = self._active
            sub._where = self._where
            sub.value(item, depth)
            digests.append(sub.finish()[0])
            self._where.pop()
        self.tag(tag)
        self.count(len(digests))
        for digest in sorted(digests):
            self.text(b"h", digest)

    def _other(self, value: object, depth: int) -> None:
        if isinstance(value, enum.Enum):
            self.text(b"E", _type_name(value))
            self.text(b"n", value.name)
            self._where.append((".{}", _Name(value.name)))
            self.value(value.value, depth + 1)
            self._where.pop()
        elif isinstance(value, _CODE_VALUES):
            from stepvisor.cache._code import code_digest  # noqa: PLC0415 - they import each other

            self.text(b"Q", code_digest(value))
        elif dataclasses.is_dataclass(value):
            self._dataclass(value, depth)
        elif _special(self, value):
            return
        else:
            mro = type(value).__mro__
            base = next((b for b in mro if b in _CONTAINERS or b in _SCALARS), None)
            if base is None:
                raise self.fail(value)
            self._subclass(value, base, depth)

    def _dataclass(self, value: Any, depth: int) -> None:
        """Its type and fields, then any other instance attribute (state all the same)."""
        names = [field.name for field in dataclasses.fields(value)]
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            names += [name for name in state if name not in names]
        self.text(b"D", _type_name(value))
        self.count(len(names))
        for name in names:
            self.text(b"n", name)
            self._where.append((".{}", _Name(name)))
            self.value(getattr(value, name), depth + 1)
            self._where.pop()

    def _subclass(self, value: Any, base: type, depth: int) -> None:
        """A subclass of a builtin scalar or container: its type, its content (read as the
        builtin's), its instance state."""
        if any(vars(c).get("__slots__") for c in type(value).__mro__ if c is not base):
            raise self.fail(value, f"a {_type_name(value)} with __slots__ state")
        self.text(b"U", _type_name(value))
        scalar = _SCALARS.get(base)
        if scalar is not None:
            scalar(self, value)
        else:
            self._container(value, depth, _CONTAINERS[base])
        if isinstance(value, collections.defaultdict):  # its factory is state outside __dict__
            self.value(value.default_factory, depth + 1)
        state = getattr(value, "__dict__", None) or {}
        self._where.append((".{}", _Name("__dict__")))
        self._container(state, depth, _CONTAINERS[dict])
        self._where.pop()


def _int(encoder: _Encoder, value: int) -> None:
    size = (value.bit_length() + 8) // 8
    encoder.blob(b"i", value.to_bytes(size, "little", signed=True))


def _float(encoder: _Encoder, value: float) -> None:
    encoder.tag(b"f")
    encoder._pending += struct.pack("<d", value)


def _complex(encoder: _Encoder, value: complex) -> None:
    encoder.tag(b"c")
    encoder._pending += struct.pack("<dd", value.real, value.imag)


def _memoryview(encoder: _Encoder, value: memoryview) -> None:
    encoder.text(b"M", f"{value.format} {value.shape}")
    encoder.blob(b"m", value.cast("B") if value.c_contiguous else value.tobytes())


_CODE_VALUES: Final = (
    types.FunctionType,
    type,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
)

_SCALARS: Final[dict[type, Callable[[_Encoder, Any], None]]] = {
    type(None): lambda e, v: e.tag(b"N"),
    type(Ellipsis): lambda e, v: e.tag(b"."),
    bool: lambda e, v: e.tag(b"T" if v else b"F"),
    int: _int,
    float: _float,
    complex: _complex,
    str: lambda e, v: e.text(b"s", v),
    bytes: lambda e, v: e.blob(b"b", v),
    bytearray: lambda e, v: e.blob(b"B", v),
    memoryview: _memoryview,
}

_CONTAINERS: Final[dict[type, Callable[[_Encoder, Any, int], None]]] = {
    tuple: lambda e, v, d: e.items(b"t", v, d),
    list: lambda e, v, d: e.items(b"l", v, d),
    dict: lambda e, v, d: e.mapping(b"d", v, d),
    set: lambda e, v, d: e.unordered(b"S", v, d),
    frozenset: lambda e, v, d: e.unordered(b"Z", v, d),
}


def _special(encoder: _Encoder, value: object) -> bool:
    """Paths, dates, numbers of the standard library: by their exact text. True if done."""
    name = _type_name(value)
    text = _SPECIAL_TEXT.get(name)
    if text is None:
        pathlib = sys.modules.get("pathlib")  # not imported: the value cannot be a path
        if pathlib is None or not isinstance(value, pathlib.PurePath):
            return False
        # pathlib.PosixPath on 3.11 and 3.12, pathlib._local.PosixPath on 3.13
        if type(value).__module__.startswith("pathlib"):
            name = f"pathlib.{type(value).__qualname__}"
        text = _path_text
    encoder.text(b"X", name)
    encoder.text(b"x", text(encoder, value))
    return True


def _path_text(encoder: _Encoder, value: Any) -> str:
    return str(value)


def _zone_text(encoder: _Encoder, value: Any) -> str:
    tz = value.tzinfo
    if tz is None:
        return str(value.isoformat())
    tz_name = _type_name(tz)
    if tz_name == "datetime.timezone":
        return f"{value.isoformat()} {tz!r}"
    if tz_name == "zoneinfo.ZoneInfo" and tz.key:
        return f"{value.isoformat()} {tz.key}"
    raise encoder.fail(value, f"a {_type_name(value)} with a tzinfo of type {tz_name}")


def _exact_text(encoder: _Encoder, value: Any) -> str:
    return str(value)


_SPECIAL_TEXT: Final[dict[str, Callable[[_Encoder, Any], str]]] = {
    "datetime.datetime": _zone_text,
    "datetime.time": _zone_text,
    "datetime.date": lambda e, v: v.isoformat(),
    "datetime.timedelta": lambda e, v: f"{v.days} {v.seconds} {v.microseconds}",
    "decimal.Decimal": _exact_text,
    "fractions.Fraction": _exact_text,
    "uuid.UUID": lambda e, v: v.hex,
}
