"""Incremental runs: reuse a step's stored result when what it computes from is unchanged.

The parts (see ``docs/guide/cache.md``)::

    _spec      Cache, and how cache= values are read (the model imports only this)
    _code      code_digest(fn): the step function's code        (the key's parts)
    _digest    value_digest(value): a parameter, item or artifact
    _key       the key: named parts, compared part by part for the note
    _entry     an entry: outputs packed with a checksum, as the store keeps it
    _session   one run's lookups and writes, on the Supervisor's thread

This package's ``__init__`` imports only :mod:`stepvisor.cache._spec`: the model
imports it while the rest of the package imports the model.
"""

from __future__ import annotations

from stepvisor.cache._spec import CACHE_FORMAT, Cache, cache_option

__all__ = ["CACHE_FORMAT", "Cache", "cache_option"]
