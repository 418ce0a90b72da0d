"""How artifact values become bytes in the SQLite store, and back.

A store picks its codec once, when it is created, and records the codec's name
in the store; every artifact row also names the codec that wrote it.

``json`` (the default) holds plain data and never runs code when read, so any
json store can be opened safely.  It is strict on purpose: a value either comes
back equal and of the same type, or it is refused when it is saved, with
:class:`~stepvisor.errors.ArtifactCodecError` - never silently changed.
Exactly these round-trip:

* ``None``, ``bool``, ``int`` (up to 4300 digits, Python's limit for
  converting ints to text), ``float`` (``nan`` and the
  infinities too, written the way Python's ``json`` writes them), ``str``
  (any, lone surrogates included: non-ASCII is written as ``\\u`` escapes);
* ``list``, and ``dict`` with ``str`` keys, nested to any depth below 500.

One deliberate exception: a ``tuple`` is accepted and comes back as a ``list``
(JSON has one sequence type; refusing tuples would refuse most step results).
Anything else is refused, including subclasses of the types above (enums,
``OrderedDict``, ``defaultdict``, numpy scalars), ``set``, ``bytes``,
``datetime``, dicts with non-``str`` keys, and containers that hold themselves.

``pickle`` holds any picklable value, but **reading a pickle store runs code**:
unpickling calls whatever the bytes name.  Use it only for stores you (and
nobody else) write; it is opt-in with ``SQLiteStore(path, codec="pickle")``.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Final, Protocol

from stepvisor.errors import ArtifactCodecError, InvalidSettingError

__all__ = ["CODECS", "Codec", "JsonCodec", "PickleCodec", "codec_named"]

#: How deep containers may nest in a json artifact (guards the recursion).
MAX_DEPTH: Final = 500

_SCALARS: Final = (str, int, float, bool, type(None))
# ensure_ascii (the default) escapes lone surrogates, which UTF-8 text cannot hold.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))


class Codec(Protocol):
    """Turns an artifact value into something SQLite stores, and back."""

    #: Recorded in the store and on every artifact row.
    name: str

    def encode(self, value: Any) -> str | bytes:
        """The stored form of ``value``; :class:`ArtifactCodecError` if it cannot be held."""
        ...

    def decode(self, data: str | bytes) -> Any:
        """The value ``encode`` was given (up to what the codec documents)."""
        ...


class _UnencodableError(Exception):
    """Internal: where in the value the codec gave up, and why."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


def _check_json(value: Any, where: str, depth: int, open_ids: set[int]) -> None:
    """Raise ``_UnencodableError`` unless ``value`` is exactly the JSON subset above."""
    kind = type(value)
    if kind in _SCALARS:
        return
    if depth >= MAX_DEPTH:
        raise _UnencodableError(where, f"nested deeper than {MAX_DEPTH} levels")
    if kind not in (dict, list, tuple):
        raise _UnencodableError(where, f"a {kind.__module__}.{kind.__qualname__} is not JSON data")
    if id(value) in open_ids:
        raise _UnencodableError(where, "it contains itself")
    open_ids.add(id(value))
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise _UnencodableError(where, f"dict key {key!r} is not a str")
            _check_json(item, f"{where}[{key!r}]", depth + 1, open_ids)
    else:
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", depth + 1, open_ids)
    open_ids.discard(id(value))


class JsonCodec:
    """Plain data as compact JSON text; see the module docstring for what round-trips."""

    name = "json"

    def encode(self, value: Any) -> str:
        try:
            if type(value) not in _SCALARS:  # scalars, the common case, need no walk
                _check_json(value, "value", 0, set())
            return _COMPACT.encode(value)
        except _UnencodableError as exc:
            where, why = exc.where, exc.why
        except ValueError as exc:  # an int too long to write as text
            where, why = "value", str(exc)
        raise ArtifactCodecError(
            f"{where}: {why}; convert it to plain JSON data "
            "(dict with str keys, list, str, int, float, bool, None), "
            "or keep it in a store created with codec='pickle' (trusted stores only)"
        )

    def decode(self, data: str | bytes) -> Any:
        return json.loads(data)


class PickleCodec:
    """Any picklable value.  Decoding RUNS CODE named by the stored bytes: trusted stores only."""

    name = "pickle"

    def encode(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling raises PicklingError, TypeError, AttributeError, ...
            raise ArtifactCodecError(
                f"value: cannot be pickled ({type(exc).__name__}: {exc}); "
                "return a value defined at module level, or convert it to plain data"
            ) from exc

    def decode(self, data: str | bytes) -> Any:
        if isinstance(data, str):
            raise ArtifactCodecError("pickled data stored as text: the store was changed by hand")
        return pickle.loads(data)  # noqa: S301 - opt-in, documented as code-executing


#: Codecs by the name a store records.
CODECS: Final[dict[str, Codec]] = {"json": JsonCodec(), "pickle": PickleCodec()}


def codec_named(name: str) -> Codec:
    """The codec called ``name``; ``InvalidSettingError`` names the choices otherwise."""
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise InvalidSettingError(
            f"unknown store codec {name!r}; use one of: {', '.join(sorted(CODECS))}"
        ) from None
