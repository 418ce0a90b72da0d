"""A cached step's key: named parts, so that a miss can say which part changed.

::

    code            code_digest(step.fn)
    param:<name>    value_digest of each parameter (``with:`` / ``params``)
    item            value_digest of a mapped instance's item
    input:<name>    the content digest of each artifact the step sees
    version         Cache(version=...)
    format          CACHE_FORMAT

Not in the key: executor, timeout, retry, pool, resources, run id: they do not
change what a step computes.  The key's digest also covers the workflow and
step ids: an entry belongs to one step of one workflow (``stepvisor cache``
lists it under them, and the note of a miss compares with that step's last entry).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Final, NamedTuple

from stepvisor.cache._spec import CACHE_FORMAT

__all__ = ["Key", "key_of", "why_changed"]

CODE: Final = "code"
VERSION: Final = "version"
FORMAT: Final = "format"
ITEM: Final = "item"
PARAM: Final = "param:"
INPUT: Final = "input:"


class Key(NamedTuple):
    """A step's key: its digest (the entry's address) and its parts by name."""

    digest: str
    parts: Mapping[str, str]


def key_of(
    workflow_id: str,
    step_id: str,
    *,
    code: str,
    params: Mapping[str, str],
    inputs: Mapping[str, str],
    version: str | None,
    item: str | None = None,
) -> Key:
    """The key of one step (or instance) from its parts' digests."""
    parts: dict[str, str] = {CODE: code, VERSION: version or "", FORMAT: str(CACHE_FORMAT)}
    if item is not None:
        parts[ITEM] = item
    for name in sorted(params):
        parts[PARAM + name] = params[name]
    for name in sorted(inputs):
        parts[INPUT + name] = inputs[name]
    h = hashlib.blake2b(digest_size=20)
    for text in (workflow_id, step_id, *(f"{k}={v}" for k, v in sorted(parts.items()))):
        h.update(text.encode())
        h.update(b"\x1f")
    return Key(h.hexdigest(), parts)


def why_changed(step_id: str, old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """The note of a miss against the step's last entry: the first part that differs.

    Parts are compared in the order a user would look for the cause: the
    format, the code, the version, the parameters, the item, the inputs.
    """
    if old.get(FORMAT) != new.get(FORMAT):
        return "computed: cache format changed"
    if old.get(CODE) != new.get(CODE):
        return f"computed: code of {step_id} changed"
    if old.get(VERSION) != new.get(VERSION):
        return "computed: version changed"
    for prefix, what in ((PARAM, "parameter"), (ITEM, "item"), (INPUT, "input")):
        names = sorted({k for k in (*old, *new) if k.startswith(prefix)})
        for name in names:
            if old.get(name) != new.get(name):
                label = name[len(prefix) :]
                return f"computed: {what} {label} changed" if label else f"computed: {what} changed"
    return "computed: no entry"
