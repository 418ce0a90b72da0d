"""The table of per-step values a run state keeps: persistent, by canonical rank.

A run's state holds one record (and one output) per step, and every
transition of every step makes a new state that shares all but the path to
the value it changed.  This module is that structure and nothing else; see
``Table`` for why it has the shape it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from pyrsistent import pvector
from pyrsistent.typing import PVector

__all__ = [
    "LEAF",
    "Table",
    "table_get",
    "table_grow",
    "table_len",
    "table_of",
    "table_set",
    "table_set_many",
    "table_values",
]

#: Per-step values are kept in leaves of 2**LEAF_BITS entries, and the leaves
#: in blocks of 2**BLOCK_BITS leaves (see ``Table``).
LEAF_BITS: Final = 9
LEAF: Final = 1 << LEAF_BITS
LEAF_MASK: Final = LEAF - 1
BLOCK_BITS: Final = 6
BLOCK: Final = 1 << BLOCK_BITS
BLOCK_MASK: Final = BLOCK - 1
BLOCK_SHIFT: Final = LEAF_BITS + BLOCK_BITS

#: One value per step, by canonical rank, as ``table[block][leaf][entry]``: a
#: tuple of blocks, each a tuple of up to ``BLOCK`` pyrsistent vectors of
#: ``LEAF`` entries, rather than one vector (or one tuple of leaves) for the
#: whole run.
#:
#: Every transition builds a new path to the value it sets, and new objects
#: are young: the cyclic GC's frequent young-generation passes traverse them,
#: visiting every reference they hold (a pyrsistent vector's traversal visits
#: every element).  One vector per run made that O(steps) work per pass, and a
#: run's cost grew with the square of its size; one tuple of leaves still held
#: steps/512 references, copied at every transition and traversed at every
#: pass (at 1,000,000 steps, ~2,000 of each, and scattered over a gigabyte, so
#: each a cache miss).  With blocks, a transition copies and the GC visits at
#: most ``LEAF`` + ``BLOCK`` + steps/``2**BLOCK_SHIFT`` references: the
#: last term stays below ``LEAF`` up to 16 million steps.
Table = tuple[tuple[PVector[Any], ...], ...]


def table_of(values: list[Any]) -> Table:
    """A table holding ``values``, the value of rank ``i`` at index ``i``."""
    leaves = [pvector(values[i : i + LEAF]) for i in range(0, len(values), LEAF)]
    return tuple(tuple(leaves[i : i + BLOCK]) for i in range(0, len(leaves), BLOCK))


def table_set(table: Table, index: int, value: Any) -> Table:
    """``table`` with ``value`` at ``index``: a new path of three, the rest shared."""
    b = index >> BLOCK_SHIFT
    block = table[b]
    k = (index >> LEAF_BITS) & BLOCK_MASK
    block = (*block[:k], block[k].set(index & LEAF_MASK, value), *block[k + 1 :])
    return (*table[:b], block, *table[b + 1 :])


def table_get(table: Table, index: int) -> Any:
    """The value at ``index``."""
    return table[index >> BLOCK_SHIFT][(index >> LEAF_BITS) & BLOCK_MASK][index & LEAF_MASK]


def table_values(table: Table) -> Iterator[Any]:
    """Every value, by index: reading leaf by leaf, without an index computed per value."""
    for block in table:
        for leaf in block:
            yield from leaf


def table_set_many(table: Table, changes: list[tuple[int, Any]]) -> Table:
    """``table`` with each ``(index, value)`` of ``changes`` set, one evolver per leaf touched."""
    blocks = [list(block) for block in table]
    evolvers: dict[tuple[int, int], Any] = {}
    for index, value in changes:
        at = (index >> BLOCK_SHIFT, (index >> LEAF_BITS) & BLOCK_MASK)
        if at not in evolvers:
            evolvers[at] = blocks[at[0]][at[1]].evolver()
        evolvers[at][index & LEAF_MASK] = value
    for (b, k), ev in evolvers.items():
        blocks[b][k] = ev.persistent()
    return tuple(map(tuple, blocks))


def table_len(table: Table) -> int:
    """How many values ``table`` holds (every block but the last is full, and every leaf
    of a block but its last)."""
    if not table:
        return 0
    last = table[-1]
    return (len(table) - 1) * BLOCK * LEAF + (len(last) - 1) * LEAF + len(last[-1])


def table_grow(table: Table, count: int) -> Table:
    """``table`` with ``count`` more values at its end, all ``None``.

    Only the last block is rebuilt: the rest is shared, as a transition shares it.
    """
    if count <= 0:
        return table
    head = table[:-1]
    last = list(table[-1]) if table else []
    if last and len(last[-1]) < LEAF:
        take = min(LEAF - len(last[-1]), count)
        last[-1] = last[-1].extend([None] * take)
        count -= take
    blocks = list(head)
    while count > 0:
        if len(last) == BLOCK:
            blocks.append(tuple(last))
            last = []
        take = min(LEAF, count)
        last.append(pvector([None] * take))
        count -= take
    blocks.append(tuple(last))
    return tuple(blocks)
