"""The workflow's graph for the HTML report: a layered drawing as inline SVG, by our code.

A reader of a report first wants the shape of the run: what fed what, and where
it broke.  The drawing is a layered ("Sugiyama") layout, small enough to write
here and run offline, with no JavaScript library and nothing fetched::

    GraphNode(id, needs, status, count)   one per step (a mapped step is one node)
        │ layer: the longest chain of needs before the node (sources in column 0)
        │ an edge that skips columns gets a bend point in each column it crosses
        │ order in a column: a few sweeps of the barycenter rule (the mean row of
        │   the neighbours in the column before, then after), which undoes most
        │   crossings of an ordinary DAG
        ▼
    columns left to right, nodes as rounded boxes coloured by status (the id, and
    "730/1000" under it when a count is given), edges as curves with arrowheads

Each node carries ``data-step`` like the timeline's bars, so the report's script
highlights a step in both at once.  Above ``MAX_NODES`` nodes (or bend points)
the graph is not drawn: the page says so, and the table still lists every step.
"""

from __future__ import annotations

import html
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from stepvisor.cli._maps import group_steps
from stepvisor.core.model import Workflow
from stepvisor.core.records import StepStatus
from stepvisor.store.base import StoredRun

__all__ = ["MAX_NODES", "GraphNode", "graph_of", "graph_svg", "nodes_from"]

#: The most steps (and, separately, bend points) drawn; beyond, a note instead.
MAX_NODES: Final = 400
_MAX_BENDS: Final = 4 * MAX_NODES
_SWEEPS: Final = 4

# Geometry, in SVG user units (pixels at 100%).
_CHAR: Final = 7.0  # average width of a 12px sans-serif character
_PAD_X: Final = 10
_MIN_W: Final = 56
_MAX_CHARS: Final = 28  # a longer id is cut, with an ellipsis (its title shows it whole)
_BOX_H: Final = 26
_BOX_H_COUNT: Final = 40  # with a second line for the count
_GAP_X: Final = 56
_GAP_Y: Final = 14
_MARGIN: Final = 12


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One box of the drawing.

    ``status`` picks the colour (a step status or attempt outcome name);
    ``count`` is ``(done, total)`` for a step that stands for many instances (a
    mapped step), drawn as "done/total" with a bar under the id; ``label``
    replaces that text when given.
    """

    id: str
    needs: tuple[str, ...] = ()
    status: str = "pending"
    count: tuple[int, int] | None = None
    label: str | None = None

    @property
    def caption(self) -> str | None:
        """The second line of the box, if any."""
        if self.label is not None:
            return self.label
        if self.count is not None:
            return f"{self.count[0]}/{self.count[1]}"
        return None


def nodes_from(
    needs: Mapping[str, Sequence[str]],
    statuses: Mapping[str, str],
    *,
    counts: Mapping[str, tuple[int, int]] | None = None,
) -> list[GraphNode]:
    """Nodes for steps ``needs`` names (in its order), with their status and any count."""
    counts = counts or {}
    return [
        GraphNode(
            step_id,
            tuple(deps),
            statuses.get(step_id, "pending"),
            counts.get(step_id),
        )
        for step_id, deps in needs.items()
    ]


def graph_of(
    workflow: Workflow, stored: StoredRun, *, counts: Mapping[str, tuple[int, int]] | None = None
) -> list[GraphNode]:
    """The graph's nodes: ``workflow``'s steps and what they depend on (``needs`` and
    artifacts), each with its status in ``stored``; a mapped step is one node with its
    count, ``(succeeded, N)`` of its instances, unless ``counts`` gives them."""
    graph = workflow.graph
    needs = {
        graph.order[r]: tuple(graph.order[d] for d in graph.deps[r])
        for r in range(len(graph.order))
    }
    statuses = {sid: record.status.value for sid, record in stored.steps.items()}
    if counts is None:  # a mapped step is one node: its instances succeeded, of how many
        counts = {
            g.record.step_id: (g.counts()[StepStatus.SUCCEEDED.value], g.size)
            for g in group_steps(stored.steps)
            if g.size is not None
        }
    return nodes_from(needs, statuses, counts=counts)


# -- layout -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    """Columns of slots (a node id, or ``None`` for an edge's bend point), and the edges
    as the chains of slots they pass through."""

    columns: list[list[int]]  # slot numbers, top to bottom
    column_of: list[int]  # slot -> column
    nodes: list[GraphNode | None]  # slot -> its node (None: a bend point)
    edges: list[list[int]]  # each a chain of slots: source, bends..., target


def _layers(nodes: Sequence[GraphNode], at: Mapping[str, int]) -> list[int]:
    """The column of each node: 1 + the deepest of its needs (Kahn's order over the needs).

    A node on a cycle (not a DAG: the caller's mistake) is never reached and stays in
    column 0, so a bad graph gives an odd drawing, never a hang.
    """
    waiting = [0] * len(nodes)
    feeds: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        for need in dict.fromkeys(node.needs):
            if need in at and at[need] != i:
                feeds[at[need]].append(i)
                waiting[i] += 1
    layer = [0] * len(nodes)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    for i in ready:  # grows as nodes become ready
        for j in feeds[i]:
            layer[j] = max(layer[j], layer[i] + 1)
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
    return layer


def _layout(nodes: Sequence[GraphNode]) -> _Layout | None:
    at = {node.id: i for i, node in enumerate(nodes)}
    layer = _layers(nodes, at)
    slots: list[GraphNode | None] = list(nodes)
    column_of = list(layer)
    edges: list[list[int]] = []
    for target, node in enumerate(nodes):
        for need in dict.fromkeys(node.needs):
            if need not in at or at[need] == target:
                continue  # a need the caller did not give a node: nothing to join
            chain = [at[need]]
            for col in range(layer[at[need]] + 1, layer[target]):
                slots.append(None)
                column_of.append(col)
                chain.append(len(slots) - 1)
            chain.append(target)
            edges.append(chain)
            if len(slots) - len(nodes) > _MAX_BENDS:
                return None
    columns: list[list[int]] = [[] for _ in range(max(column_of, default=-1) + 1)]
    for slot, col in enumerate(column_of):
        columns[col].append(slot)
    _order(columns, edges)
    return _Layout(columns, column_of, slots, edges)


def _order(columns: list[list[int]], edges: Sequence[Sequence[int]]) -> None:
    """Reorder each column by the barycenter of its neighbours, sweeping right then left."""
    before: dict[int, list[int]] = {}
    after: dict[int, list[int]] = {}
    for chain in edges:
        for a, b in itertools.pairwise(chain):
            after.setdefault(a, []).append(b)
            before.setdefault(b, []).append(a)
    for sweep in range(_SWEEPS):
        rightward = sweep % 2 == 0
        indices = range(1, len(columns)) if rightward else range(len(columns) - 2, -1, -1)
        for c in indices:
            ref = columns[c - 1] if rightward else columns[c + 1]
            columns[c] = _by_barycenter(columns[c], ref, before if rightward else after)


def _by_barycenter(
    column: Sequence[int], ref: Sequence[int], links: Mapping[int, Sequence[int]]
) -> list[int]:
    """``column`` sorted by the mean row in ``ref`` of each slot's links (stable; a slot
    without links in ``ref`` keeps its row)."""
    row = {slot: i for i, slot in enumerate(ref)}

    def key(item: tuple[int, int]) -> float:
        here, slot = item
        near = [row[n] for n in links.get(slot, ()) if n in row]
        return sum(near) / len(near) if near else float(here)

    return [slot for _, slot in sorted(enumerate(column), key=key)]


# -- drawing ----------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 1] + "…"


def _width(node: GraphNode | None) -> float:
    if node is None:
        return 0.0
    chars = max(len(_short(node.id)), len(node.caption or ""))
    return max(_MIN_W, chars * _CHAR + 2 * _PAD_X)


def graph_svg(nodes: Sequence[GraphNode], colors: Mapping[str, str]) -> str:
    """The drawing of ``nodes`` as an ``<svg>`` element, or a note saying why there is none."""
    if not nodes:
        return '<p class="muted">The workflow has no steps.</p>'
    layout = _layout(nodes) if len(nodes) <= MAX_NODES else None
    if layout is None:
        return (
            f'<p class="muted">{len(nodes)} steps: too many to draw legibly (the graph is '
            f"drawn up to {MAX_NODES}); the table below lists every step.</p>"
        )
    box_h = _BOX_H_COUNT if any(n.caption for n in nodes) else _BOX_H
    col_w = [max((_width(layout.nodes[s]) for s in col), default=0.0) for col in layout.columns]
    col_x = [_MARGIN + sum(col_w[:c]) + _GAP_X * c for c in range(len(col_w))]
    tallest = max(len(col) for col in layout.columns)
    height = 2 * _MARGIN + tallest * box_h + (tallest - 1) * _GAP_Y
    width = col_x[-1] + col_w[-1] + _MARGIN
    centre: dict[int, float] = {}
    for col in layout.columns:
        top = (height - (len(col) * box_h + (len(col) - 1) * _GAP_Y)) / 2
        for i, slot in enumerate(col):
            centre[slot] = top + i * (box_h + _GAP_Y) + box_h / 2
    parts = [
        f'<svg class="graph" viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
        f'height="{height:.0f}" role="img" aria-label="graph of the workflow\'s steps">'
        '<defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" '
        'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" '
        'class="arrowhead"/></marker></defs>'
    ]
    for chain in layout.edges:
        parts.append(_edge(chain, layout, col_x, col_w, centre))
    for slot, node in enumerate(layout.nodes):
        if node is not None:
            left = col_x[layout.column_of[slot]]
            parts.append(_box(node, left, centre[slot], box_h, colors))
    parts.append("</svg>")
    return "".join(parts)


def _edge(
    chain: Sequence[int],
    layout: _Layout,
    col_x: Sequence[float],
    col_w: Sequence[float],
    centre: Mapping[int, float],
) -> str:
    """A curve from the source's right side through each bend's column to the target's left."""
    points: list[tuple[float, float]] = []
    for k, slot in enumerate(chain):
        col = layout.column_of[slot]
        y = centre[slot]
        node = layout.nodes[slot]
        if k == 0:
            points.append((col_x[col] + _width(node), y))
        elif k == len(chain) - 1:
            points.append((col_x[col], y))
        else:  # a bend point: across its column, level
            points += [(col_x[col], y), (col_x[col] + col_w[col], y)]
    x0, y0 = points[0]
    path = [f"M{x0:.1f},{y0:.1f}"]
    for (xa, ya), (xb, yb) in itertools.pairwise(points):
        if ya == yb:
            path.append(f"L{xb:.1f},{yb:.1f}")
            continue
        mid = (xa + xb) / 2
        path.append(f"C{mid:.1f},{ya:.1f} {mid:.1f},{yb:.1f} {xb:.1f},{yb:.1f}")
    source, target = layout.nodes[chain[0]], layout.nodes[chain[-1]]
    assert source is not None
    assert target is not None
    return (
        f'<path class="edge" d="{" ".join(path)}" marker-end="url(#arrow)" '
        f'data-from="{_e(source.id)}" data-to="{_e(target.id)}"/>'
    )


def _box(
    node: GraphNode, left: float, centre: float, box_h: float, colors: Mapping[str, str]
) -> str:
    width = _width(node)
    top = centre - box_h / 2
    caption = node.caption
    title = f"{node.id}: {node.status.replace('_', ' ')}" + (f", {caption}" if caption else "")
    text_y = top + (17 if caption else box_h / 2 + 4)
    parts = [
        f'<g class="node" data-step="{_e(node.id)}" data-status="{_e(node.status)}">'
        f"<title>{_e(title)}</title>"
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{width:.1f}" height="{box_h}" rx="6" '
        f'fill="{colors.get(node.status, "#888")}"/>'
        f'<text class="node-id" x="{left + width / 2:.1f}" y="{text_y:.1f}">'
        f"{_e(_short(node.id))}</text>"
    ]
    if caption:
        parts.append(
            f'<text class="node-count" x="{left + width / 2:.1f}" y="{top + 32:.1f}">'
            f"{_e(caption)}</text>"
        )
    if node.count is not None and node.count[1] > 0:
        done = min(max(node.count[0] / node.count[1], 0.0), 1.0)
        parts.append(
            f'<rect class="node-done" x="{left + 4:.1f}" y="{top + box_h - 5:.1f}" '
            f'width="{(width - 8) * done:.1f}" height="2"/>'
        )
    parts.append("</g>")
    return "".join(parts)
