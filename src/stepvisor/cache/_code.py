"""The code digest: the part of a cache key that changes when a step's code changes.

Prefect's ``TASK_SOURCE`` hashes a task's source text, so two tasks with one body and
different closures share an entry (prefect#23062), and joblib.Memory misses a change in
a helper that the cached function calls.  This digest reads what the function *runs*.

What is in the digest (the rules; the user guide quotes them)
------------------------------------------------------------

1. The function's code object: bytecode, constants, names, argument and variable names,
   flags, exception table, name and qualified name; nested code objects (inner functions,
   lambdas, comprehensions, class bodies) recursively.  Not its file name or line
   numbers: moving a function or adding a blank line above it changes nothing (a docstring
   is a constant, so editing one does change the digest: a safe miss).
   The interpreter's version is in it too (bytecode differs between Python versions).
2. Its default and keyword-default values, and the values in its closure cells, by their
   content (:func:`~stepvisor.cache._digest.value_digest`).  A function, class or module
   held there is followed like a global (rule 3).
3. The globals its code reads (every name of ``co_names``, in its nested code too, that
   the function's module defines), each followed by what it is:

   * a function or class *of the user's own modules* (not the standard library, not an
     installed package in site-packages/dist-packages or the interpreter's folders, not
     stepvisor; ``__main__`` is the user's): its code digest, recursively, each one once
     (cycles end);
   * a module of the user's: the attributes of it that the code names, so ``helpers.clean``
     and ``pkg.sub.fn`` chains are followed;
   * plain data: numbers, ``str``, ``bytes``, ``None``, ``bool``, enum members, and
     tuples or frozensets of these: their value;
   * a library function, class or module: its name only;
   * anything else, a *global object* (a list, a dict, an instance, an array): its type
     (and the code of that type's class if the class is the user's), NOT its content.

   A package installed in editable mode (``pip install -e``) lives in the user's tree and
   counts as the user's.
4. A module of the user's that the function imports *inside* its body (``import helpers``,
   ``from . import x``, ``from .y import z``): if it is imported already, as a global module
   (rule 3: the code in memory is what runs, even if its file was edited since); if not
   yet, the bytes of its source file, found on ``sys.path`` without importing it.  So the
   first run of a process may compute once more than later ones, never reuse wrongly.
5. A class, referenced or as the step itself: its qualified name, its bases and its
   metaclass (rule 3), and every attribute of its body: methods (also static and class
   methods, properties) by their code, other attributes by their content when readable.
6. A bound method: its function and its ``self`` (as a global object: the type's code).
   A ``functools.partial``: its function and its arguments' values.  A callable instance:
   its class and its instance ``__dict__`` (by content when it can be read).  A decorated
   function: the wrapper and, through ``__wrapped__``, the function it wraps.

What is NOT tracked (say ``Cache(version=...)`` to invalidate by hand): the content of a
global object (rule 3) or of a mutable class attribute that cannot be read; the code of
libraries (a new version of an installed package); files, environment variables,
databases, the time, randomness; code reached only through ``getattr`` with a computed
name, ``importlib``, or attributes of objects (``self.helper`` is followed only as the
class's method); what a module imported inside the function, and not imported yet,
imports in turn (rule 4); C extensions.  A value that cannot be read is named in the
digest by its type.  A function that cannot be read at all gets a digest that matches
nothing (the step always computes), so this never raises.

Memoized per function object: a later call costs a check that each thing read is still
the same object (and, for mutable default or closure values up to 64 KiB, still the same
content).  A larger mutable default or closure value changed in place within one process
is not seen by that check (a new function object, or a new process, sees it).
"""

from __future__ import annotations

import enum
import functools
import importlib.util
import os
import sys
import threading
import types
from collections.abc import Callable, Mapping
from typing import Any, Final

from stepvisor.cache._bytecode import IdentityMemo, Import, Tokens, code_facts, qualified
from stepvisor.cache._digest import UnhashableValue, _digest_sized, new_hasher, value_digest
from stepvisor.cache._guards import (
    ATTR,
    CELL,
    CONTENT,
    FILE,
    ITEM,
    KEYS,
    MISSING,
    Checks,
    Guard,
    cell_contents,
    file_facts,
)
from stepvisor.cache._where import (
    is_user_function,
    is_user_module,
    is_user_module_object,
    user_module_file,
)

__all__ = ["code_digest"]

#: Mutable values up to this many encoded bytes are re-digested when a memo is checked.
_RECHECK_LIMIT: Final = 1 << 16
#: Class attributes that are the class's own machinery, not what it computes.
_CLASS_SKIP: Final = frozenset(
    {"__dict__", "__weakref__", "__module__", "__doc__", "__firstlineno__"}  # the last: 3.13
)
_PLAIN: Final = frozenset({int, float, complex, str, bytes, bool, type(None)})
_BUILTIN_CALLABLES: Final = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)
_REFERENCES: Final = (
    types.FunctionType,
    type,
    types.ModuleType,
    types.MethodType,
    functools.partial,
    *_BUILTIN_CALLABLES,
)


def code_digest(fn: Callable[..., object]) -> str:
    """Hex digest of ``fn``'s code by the rules of the module docstring; never raises."""
    stack = _progress()
    try:
        if stack:  # a function inside a value inside a function being digested
            if any(item is fn for item in stack):
                return _cycle_digest(fn)
            return _computed(fn, stack)[0]
        known = _memo.get(fn)
        if known is not None and known[1].hold(fn):
            return known[0]
        digest, guards = _computed(fn, stack)
        _memo.put(fn, (digest, Checks(guards, fn)))
    except Exception:
        return os.urandom(32).hex()  # unreadable: a digest that matches nothing, ever
    return digest


# -- the memo -----------------------------------------------------------------------------

_memo: IdentityMemo[tuple[str, Checks]] = IdentityMemo()
_local = threading.local()


def _progress() -> list[object]:
    """The functions being digested on this thread, outermost first."""
    stack: list[object] | None = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _computed(fn: object, stack: list[object]) -> tuple[str, tuple[Guard, ...]]:
    stack.append(fn)
    try:
        walk = _Walk()
        walk.top(fn)
        return walk.finish()
    finally:
        stack.pop()


def _cycle_digest(fn: object) -> str:
    """Stands for a function met again inside a value it holds (the cycle ends there)."""
    hasher = new_hasher()
    hasher.update(f"cycle:{qualified(fn)}".encode())
    return hasher.hexdigest()


class _Walk:
    """One digest: visits the callable and what it reaches, writing tokens and guards.

    Each function and class is written once; a later meeting writes its visit number,
    so shared helpers cost once and cycles end, and the result does not depend on ids.
    """

    def __init__(self) -> None:
        self.out = Tokens()
        self.seen: dict[int, int] = {}
        self.keep: list[object] = []  # what ``seen`` holds ids of stays alive meanwhile
        self.modules: list[int] = []  # the modules on the current path (cycles end)
        self.guards: dict[tuple[int, int, object], Guard] = {}

    def finish(self) -> tuple[str, tuple[Guard, ...]]:
        return self.out.digest(), tuple(self.guards.values())

    def guard(self, kind: int, holder: object, key: object, expected: object) -> None:
        self.guards[(kind, id(holder), key)] = (kind, holder, key, expected)

    def attr(self, holder: object, name: str) -> Any:
        value = getattr(holder, name)
        self.guard(ATTR, holder, name, value)
        return value

    def item(self, mapping: Mapping[str, Any], name: str) -> Any:
        value = mapping.get(name, MISSING)
        self.guard(ITEM, mapping, name, value)
        return value

    def first_visit(self, obj: object) -> bool:
        index = self.seen.get(id(obj))
        if index is not None:
            self.out.put(b"@", str(index))
            return False
        self.seen[id(obj)] = len(self.seen)
        self.keep.append(obj)
        return True

    # -- what the step is -------------------------------------------------------------

    def top(self, fn: object) -> None:
        if isinstance(fn, types.FunctionType) and is_user_function(
            fn.__module__, fn.__code__.co_filename
        ):
            self.function(fn)
        elif _is_reference(fn):
            self.ref(fn, ())
        else:  # a callable instance: its class and its state
            self.out.put(b"i", qualified(type(fn)))
            self.ref(type(fn), ())
            state = getattr(fn, "__dict__", None)
            if isinstance(state, dict):
                self.held(state, ())

    # -- what code reaches ------------------------------------------------------------

    def ref(self, obj: object, names: tuple[str, ...]) -> None:
        """Something a global name, a module attribute or a class attribute refers to."""
        if _is_plain(obj):
            self.plain(obj)
        elif isinstance(obj, types.FunctionType | type | types.ModuleType):
            self.code(obj, names)
        elif isinstance(obj, _BUILTIN_CALLABLES):
            self.out.put(b"L", qualified(obj))
        else:
            self.compound(obj, names)

    def code(
        self, obj: types.FunctionType | type | types.ModuleType, names: tuple[str, ...]
    ) -> None:
        """A function, class or module: followed if the user's, named if a library's."""
        if isinstance(obj, types.FunctionType):
            if is_user_function(obj.__module__, obj.__code__.co_filename):
                self.function(obj)
            else:
                self.out.put(b"L", qualified(obj))
        elif isinstance(obj, type):
            if is_user_module(obj.__module__):
                self.klass(obj)
            else:
                self.out.put(b"L", qualified(obj))
        elif is_user_module_object(obj):
            self.module(obj, names)
        else:
            self.out.put(b"l", str(vars(obj).get("__name__")))

    def compound(self, obj: object, names: tuple[str, ...]) -> None:
        """A method, a partial, a decorated callable, or a global object."""
        if isinstance(obj, types.MethodType):
            self.out.put(b"m", "")
            self.ref(obj.__func__, names)
            self.ref(obj.__self__, names)
        elif isinstance(obj, functools.partial):
            self.out.put(b"p", "")
            self.ref(obj.func, names)
            self.held(obj.args, names)
            self.held(obj.keywords, names)
        else:
            state = getattr(obj, "__dict__", None)
            wrapped = state.get("__wrapped__", MISSING) if isinstance(state, dict) else MISSING
            self.out.put(b"o", qualified(type(obj)))
            self.ref(type(obj), ())
            if wrapped is not MISSING and isinstance(state, dict):
                self.guard(ITEM, state, "__wrapped__", wrapped)
                self.ref(wrapped, names)

    def held(self, value: object, names: tuple[str, ...]) -> None:
        """A value held by the code (a default, a closure cell): by content if readable."""
        if _is_plain(value) or _is_reference(value):
            self.ref(value, names)
            return
        try:
            digest, size = _digest_sized(value)
        except Exception:  # unreadable (an open file, an object): named by its type
            self.ref(value, names)
            return
        self.out.put(b"v", digest)
        if size <= _RECHECK_LIMIT:
            self.guard(CONTENT, value, None, digest)

    def plain(self, value: object) -> None:
        try:
            self.out.put(b"v", value_digest(value))
        except UnhashableValue:  # an enum member whose value cannot be read
            self.out.put(b"e", qualified(type(value)) + "." + str(getattr(value, "name", "")))

    def function(self, fn: types.FunctionType) -> None:
        if not self.first_visit(fn):
            return
        code = self.attr(fn, "__code__")
        digest, names, imports = code_facts(code)
        self.out.put(b"F", digest)
        defaults = self.attr(fn, "__defaults__") or ()
        self.out.count(len(defaults))
        for value in defaults:
            self.held(value, names)
        kwdefaults = self.attr(fn, "__kwdefaults__")
        if kwdefaults:
            self.guard(KEYS, kwdefaults, None, tuple(kwdefaults))
        for name in tuple(kwdefaults or ()):
            self.out.put(b"n", name)
            self.held(self.item(kwdefaults, name), names)
        cells = zip(code.co_freevars, fn.__closure__ or (), strict=True)
        for index, (name, cell) in enumerate(cells):
            contents = cell_contents(cell)
            self.guard(CELL, fn, index, contents)
            self.out.put(b"n", name)
            if contents is MISSING:
                self.out.put(b"-", "")
            else:
                self.held(contents, names)
        self.names(fn.__globals__, names)
        for imported in imports:
            self.local_import(imported, fn.__globals__, names)
        wrapped = self.item(fn.__dict__, "__wrapped__")
        if wrapped is not MISSING:
            self.out.put(b"w", "")
            self.ref(wrapped, names)

    def names(self, namespace: dict[str, Any], names: tuple[str, ...]) -> None:
        for name in names:
            value = self.item(namespace, name)
            if value is not MISSING:
                self.out.put(b"n", name)
                self.ref(value, names)

    def local_import(
        self, imported: Import, namespace: dict[str, Any], names: tuple[str, ...]
    ) -> None:
        """A user's module imported inside the function: what the step will run.

        Imported already: the code in memory runs, so it is read as a global module is (the
        attributes the function names), even if its file was edited since.  Not imported
        yet: the file will be, so its source bytes are read, without importing it.  The
        first run of a process and the later ones may so differ (one extra computation per
        code version: both digests are the same in every process); never a wrong hit.
        What the module imports in turn is read only in the first case.
        """
        name, level, from_names = imported
        if level:
            package = namespace.get("__package__")
            try:
                name = importlib.util.resolve_name("." * level + name, package)
            except (ImportError, ValueError, TypeError):
                self.out.put(b"?", f"{level}:{name}")
                return
        self.out.put(b"I", name)
        for candidate in (name, *(f"{name}.{n}" if name else n for n in from_names)):
            module = self.item(sys.modules, candidate)
            if isinstance(module, types.ModuleType):
                if is_user_module_object(module):
                    self.module(module, names)
                continue
            filename = user_module_file(candidate)
            if filename is not None:
                stamp, digest = file_facts(filename)
                self.out.put(b"h", digest)
                self.guard(FILE, filename, None, stamp)

    def module(self, module: types.ModuleType, names: tuple[str, ...]) -> None:
        if id(module) in self.modules:
            self.out.put(b"R", module.__name__)
            return
        self.out.put(b"M", module.__name__)
        self.modules.append(id(module))
        self.names(vars(module), names)
        self.modules.pop()

    def klass(self, cls: type) -> None:
        if not self.first_visit(cls):
            return
        self.out.put(b"C", qualified(cls))
        for base in self.attr(cls, "__bases__"):
            self.ref(base, ())
        self.ref(type(cls), ())  # the metaclass: type, or one of the user's
        body = cls.__dict__
        keys = tuple(body)
        self.guard(KEYS, body, None, keys)
        for key in keys:
            if key in _CLASS_SKIP:
                continue
            self.out.put(b"n", key)
            self.member(self.item(body, key))

    def member(self, value: object) -> None:
        if isinstance(value, staticmethod | classmethod):
            self.out.put(b"s", type(value).__name__)
            self.ref(value.__func__, ())
        elif isinstance(value, property):
            self.out.put(b"P", "")
            for accessor in (value.fget, value.fset, value.fdel):
                self.ref(accessor, ())
        elif isinstance(value, functools.cached_property):
            self.out.put(b"P", "cached")
            self.ref(value.func, ())
        else:
            self.held(value, ())


def _is_plain(value: object) -> bool:
    """Plain data by the rules: numbers, str, bytes, None, enums, tuples/frozensets of them."""
    kind = type(value)
    if kind in _PLAIN or isinstance(value, enum.Enum):
        return True
    if kind is tuple or kind is frozenset:
        return all(_is_plain(item) for item in value)  # type: ignore[attr-defined]
    return False


def _is_reference(value: object) -> bool:
    """Code rather than data: followed by :meth:`_Walk.ref`, never read as a value."""
    return isinstance(value, _REFERENCES)
