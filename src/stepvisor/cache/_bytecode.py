"""The digest of a code object on its own, and the names its code uses.

A code object is immutable, so its digest is computed once per object and remembered
(until the object is gone); the functions made from it (each lambda of a loop, each
closure made by a factory) share that work and differ only in what they hold::

    code object ──> interpreter tag, counts, flags, bytecode, exception table,
                    names, variable names, name, qualified name,
                    constants (nested code objects by their own digest, recursively)

Line numbers, the file name and the line table are left out: moving code changes nothing.
"""

from __future__ import annotations

import contextlib
import dis
import sys
import types
import weakref
from typing import Any, Generic, TypeVar

from stepvisor.cache._digest import UnhashableValue, new_hasher, value_digest

__all__ = ["Facts", "IdentityMemo", "Import", "Tokens", "code_facts", "qualified"]

V = TypeVar("V")


class IdentityMemo(Generic[V]):
    """Values by object *identity*, each dropped when its object is garbage.

    Not a WeakKeyDictionary: that compares keys with ``__eq__``, and two equal objects
    (code objects that differ only in line numbers, callables with a custom ``__eq__``)
    must not share an entry.
    """

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[Any], V]] = {}

    def get(self, obj: object) -> V | None:
        entry = self._items.get(id(obj))
        if entry is not None and entry[0]() is obj:
            return entry[1]
        return None

    def put(self, obj: object, value: V) -> None:
        """Remember ``value`` for ``obj``; nothing if ``obj`` cannot be weakly referenced."""
        items, key = self._items, id(obj)

        def forget(ref: weakref.ref[Any]) -> None:  # holds items itself: safe at shutdown
            entry = items.get(key)
            if entry is not None and entry[0] is ref:
                del items[key]

        with contextlib.suppress(TypeError):
            items[key] = (weakref.ref(obj, forget), value)


#: An ``import`` statement inside a function: (module name, level of a relative import,
#: the names of ``from ... import``).
Import = tuple[str, int, tuple[str, ...]]
Facts = tuple[str, tuple[str, ...], tuple[Import, ...]]

_code_memo: IdentityMemo[Facts] = IdentityMemo()


def code_facts(code: types.CodeType) -> Facts:
    """The digest of a code object alone, every name it and its nested code use, and the
    modules they import inside the function."""
    known = _code_memo.get(code)
    if known is not None:
        return known
    out = Tokens()
    names: dict[str, None] = dict.fromkeys(code.co_names)
    imports: dict[Import, None] = dict.fromkeys(_imports(code))
    out.put(b"K", sys.implementation.cache_tag or sys.version)
    for number in (
        code.co_argcount,
        code.co_posonlyargcount,
        code.co_kwonlyargcount,
        code.co_flags,
        code.co_nlocals,
    ):
        out.put(b"#", str(number))
    out.blob(b"c", code.co_code)
    out.blob(b"x", code.co_exceptiontable)
    for group in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars):
        out.put(b"g", "\x00".join(group))
    out.put(b"n", code.co_name)
    out.put(b"q", code.co_qualname)
    out.count(len(code.co_consts))
    for const in code.co_consts:
        _const(out, const, names, imports)
    facts = (out.digest(), tuple(names), tuple(imports))
    _code_memo.put(code, facts)
    return facts


def _imports(code: types.CodeType) -> list[Import]:
    """The ``IMPORT_NAME`` instructions of ``code`` (not nested code), with their level and
    ``from`` names: the two constants loaded just before each."""
    found: list[Import] = []
    consts: list[object] = [None, None]
    for instruction in dis.get_instructions(code):
        if instruction.opname == "LOAD_CONST":
            consts = [consts[-1], instruction.argval]
        elif instruction.opname == "IMPORT_NAME":
            level, fromlist = consts
            listed = fromlist if isinstance(fromlist, tuple) else ()
            names = tuple(n for n in listed if isinstance(n, str) and n != "*")
            level = level if isinstance(level, int) else 0
            found.append((str(instruction.argval), level, names))
    return found


def _const(out: Tokens, const: object, names: dict[str, None], imports: dict[Import, None]) -> None:
    if isinstance(const, types.CodeType):
        digest, inner, inner_imports = code_facts(const)
        names.update(dict.fromkeys(inner))
        imports.update(dict.fromkeys(inner_imports))
        out.put(b"k", digest)
    elif type(const) is tuple:
        out.count(len(const))
        for item in const:
            _const(out, item, names, imports)
    elif type(const) is frozenset:
        parts = []
        for item in const:
            sub = Tokens()
            _const(sub, item, names, imports)
            parts.append(sub.digest())
        out.put(b"z", ",".join(sorted(parts)))
    else:
        try:
            out.put(b"v", value_digest(const))
        except UnhashableValue:  # a literal of a type the value digest does not read
            out.put(b"r", f"{qualified(type(const))}:{const!r}")


class Tokens:
    """Length-prefixed tokens gathered into one buffer, hashed at the end."""

    __slots__ = ("_out",)

    def __init__(self) -> None:
        self._out = bytearray()

    def blob(self, tag: bytes, data: bytes) -> None:
        self._out += tag
        self._out += len(data).to_bytes(8, "little")
        self._out += data

    def put(self, tag: bytes, text: str) -> None:
        self.blob(tag, text.encode("utf-8", "surrogatepass"))

    def count(self, n: int) -> None:
        self._out += b"#"
        self._out += n.to_bytes(8, "little")

    def digest(self) -> str:
        hasher = new_hasher()
        hasher.update(self._out)
        return hasher.hexdigest()


def qualified(obj: object) -> str:
    """``module.qualname`` of a function or class (or of ``obj``'s type): a stable name."""
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not isinstance(name, str):
        name = type(obj).__qualname__
    return f"{module}.{name}" if isinstance(module, str) else name
