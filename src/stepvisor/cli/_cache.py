"""``stepvisor cache``: list the cache's entries, clear it, or prune it to a bound.

::

    stepvisor cache [--store PATH]                       the entries, newest first
    stepvisor cache clear [--store PATH]                  remove every entry
    stepvisor cache prune [--older-than 7d] [--max-size 2G] [--store PATH]

After removing entries the store file is compacted (``VACUUM``), so that the
disk use really goes down; when another program holds the store open for
writing the compaction is left for later, and the freed pages are reused by
the next entries.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from stepvisor.cache._prune import parse_age, parse_size, to_prune
from stepvisor.cli._output import EXIT_OK, table, when
from stepvisor.errors import StepvisorError
from stepvisor.store.sqlite import SQLiteStore

__all__ = ["add_cache_command", "size_text"]


def size_text(size: int) -> str:
    """``1.5 MiB``: a size for people."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - the loop returns


def age_text(seconds: float) -> str:
    """``3d``, ``5h``, ``12m``, ``40s``: how long ago."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def add_cache_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    *,
    add_store: Callable[[argparse.ArgumentParser], None],
    open_store: Callable[[str], SQLiteStore],
) -> None:
    """Register ``stepvisor cache`` (its handlers open the store with ``open_store``)."""
    p = sub.add_parser("cache", help="list the cache of step results, clear it or prune it")
    add_store(p)
    actions = p.add_subparsers(dest="cache_action", metavar="ACTION")
    clear = actions.add_parser("clear", help="remove every entry")
    add_store(clear)
    prune = actions.add_parser("prune", help="remove old entries, or the least used past a size")
    prune.add_argument("--older-than", metavar="AGE", help="unused for longer than AGE (7d, 12h)")
    prune.add_argument("--max-size", metavar="SIZE", help="keep at most SIZE (2G, 500M)")
    add_store(prune)

    def handler(args: argparse.Namespace) -> int:
        older = parse_age(args.older_than) if getattr(args, "older_than", None) else None
        bound = parse_size(args.max_size) if getattr(args, "max_size", None) else None
        if args.cache_action == "prune" and older is None and bound is None:
            raise StepvisorError(
                "prune needs a bound: stepvisor cache prune --older-than 7d and/or --max-size 2G"
            )
        with open_store(args.store) as store:
            if args.cache_action is None:
                return _list(store)
            entries = store.cache_list()
            if args.cache_action == "clear":
                keys = [e.key for e in entries]
            else:
                keys = to_prune(entries, now=time.time(), older_than=older, max_size=bound)
            gone = store.cache_delete(keys)
            freed = sum(e.size for e in entries if e.key in set(keys))
            compacted = store.compact() if gone else True
            left = len(entries) - gone
            print(
                f"removed {gone} entries ({size_text(freed)}); {left} left"
                + ("" if compacted else "; the file is compacted later (the store is busy)")
            )
            return EXIT_OK

    for parser in (p, clear, prune):
        parser.set_defaults(handler=handler)


def _list(store: SQLiteStore) -> int:
    entries = store.cache_list()
    if not entries:
        print(f"the cache of {store.path} is empty; steps with cache=True fill it")
        return EXIT_OK
    now = time.time()
    rows = [
        [e.step_id, e.workflow_id, size_text(e.size), age_text(now - e.created),
         when(e.last_used), e.run_id]
        for e in entries
    ]  # fmt: skip
    print(table(["STEP", "WORKFLOW", "SIZE", "AGE", "LAST USE", "RUN"], rows))
    total = sum(e.size for e in entries)
    print(f"{len(entries)} entries, {size_text(total)}")
    return EXIT_OK
