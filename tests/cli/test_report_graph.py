"""The report's drawing of the workflow's graph: every step once, coloured by status,
an arrow per dependency, left to right, readable in a real browser."""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.cli._graph import MAX_NODES, GraphNode, graph_svg, nodes_from
from stepvisor.cli._report import _STATUS_COLORS, graph_of, render_html, write_html
from stepvisor.cli.main import main
from stepvisor.core.state import StepStatus
from stepvisor.store.base import StoredRun
from tests.browser import chromium, need_chromium, screenshot


def ok(ctx: sv.StepContext) -> dict[str, Any]:
    return {f"{ctx.step_id}_out": 1}


def bad(ctx: sv.StepContext) -> None:
    raise ValueError("no features today")


def _workflow() -> sv.Workflow:
    return sv.Workflow(
        "graph-demo",
        [
            sv.Step("extract", ok, creates=["extract_out"]),
            sv.Step("clean", ok, needs=["extract"]),
            sv.Step("features_a", ok, needs=["clean"]),
            sv.Step("features_b", bad, needs=["clean"]),
            sv.Step("train", ok, needs=["features_a", "features_b"]),
            # Needs "extract" by its artifact: an edge as well, over three columns.
            sv.Step("report", ok, needs=["train"], requires=["extract_out"]),
            sv.Step("lint", ok),
        ],
        settings=sv.Settings(on_failure="continue", max_parallel=2),
    )


@pytest.fixture
def run() -> tuple[sv.Workflow, StoredRun]:
    wf = _workflow()
    store = sv.MemoryStore()
    result = sv.run(wf, store=store)
    assert result.statuses()["features_b"] is StepStatus.FAILED
    return wf, store.load(result.run_id)


class Drawn:
    """The parsed drawing: each node's box and status, each edge's ends and path."""

    def __init__(self, svg: str) -> None:
        root = ET.fromstring(svg)  # inline SVG in HTML: no namespace (and no URL)
        self.boxes: dict[str, tuple[float, float, float, float]] = {}
        self.status: dict[str, str] = {}
        self.fill: dict[str, str] = {}
        self.texts: dict[str, list[str]] = {}
        for g in root.iter("g"):
            step = g.attrib["data-step"]
            rect = g.find("rect")
            assert rect is not None
            self.boxes[step] = tuple(  # type: ignore[assignment]
                float(rect.attrib[k]) for k in ("x", "y", "width", "height")
            )
            self.status[step] = g.attrib["data-status"]
            self.fill[step] = rect.attrib["fill"]
            self.texts[step] = [t.text or "" for t in g.iter("text")]
        self.edges = {
            (p.attrib["data-from"], p.attrib["data-to"]): p.attrib["d"]
            for p in root.iter("path")
            if p.attrib.get("class") == "edge"
        }


def _points(path: str) -> list[tuple[float, float]]:
    """The points a path goes through (its segments' ends, not the curves' controls)."""
    points = []
    for command in re.findall(r"[MLC][^MLC]*", path):
        x, y = command.split()[-1].lstrip("MLC").split(",")
        points.append((float(x), float(y)))
    return points


def test_each_step_is_one_node_coloured_by_its_status_with_an_arrow_per_dependency(
    run: tuple[sv.Workflow, StoredRun],
) -> None:
    wf, stored = run
    drawn = Drawn(graph_svg(graph_of(wf, stored), _STATUS_COLORS))
    statuses = {sid: record.status.value for sid, record in stored.steps.items()}
    assert drawn.status == statuses
    assert statuses["train"] == "skipped"
    assert drawn.fill == {sid: _STATUS_COLORS[status] for sid, status in statuses.items()}
    assert set(drawn.edges) == {
        ("extract", "clean"),
        ("clean", "features_a"),
        ("clean", "features_b"),
        ("features_a", "train"),
        ("features_b", "train"),
        ("train", "report"),
        ("extract", "report"),  # by the artifact
    }


def test_steps_stand_left_to_right_after_what_they_need(
    run: tuple[sv.Workflow, StoredRun],
) -> None:
    drawn = Drawn(graph_svg(graph_of(*run), _STATUS_COLORS))
    for source, target in drawn.edges:
        sx, _, sw, _ = drawn.boxes[source]
        assert drawn.boxes[target][0] > sx + sw, (source, target)
        start, *_, end = _points(drawn.edges[source, target])
        assert start[0] == pytest.approx(sx + sw)  # leaves the source's right side
        assert end[0] == pytest.approx(drawn.boxes[target][0])  # reaches the target's left
    lefts = sorted({box[0] for box in drawn.boxes.values()})
    assert drawn.boxes["extract"][0] == drawn.boxes["lint"][0] == lefts[0]
    assert len(lefts) == 5  # extract, clean, features, train, report


def test_an_edge_that_skips_columns_goes_between_the_nodes_it_passes(
    run: tuple[sv.Workflow, StoredRun],
) -> None:
    drawn = Drawn(graph_svg(graph_of(*run), _STATUS_COLORS))
    bends = _points(drawn.edges["extract", "report"])[1:-1]
    assert len(bends) == 6  # across three columns: in and out of each
    for x, y in bends:
        for step, (bx, by, bw, bh) in drawn.boxes.items():
            inside = bx - 0.5 <= x <= bx + bw + 0.5 and by <= y <= by + bh
            assert not inside, (step, x, y)


def test_the_order_in_a_column_undoes_crossings() -> None:
    nodes = [
        GraphNode("a1"),
        GraphNode("a2"),
        GraphNode("b1", needs=("a2",)),
        GraphNode("b2", needs=("a1",)),
    ]
    drawn = Drawn(graph_svg(nodes, _STATUS_COLORS))
    assert drawn.boxes["a1"][1] < drawn.boxes["a2"][1]
    assert drawn.boxes["b2"][1] < drawn.boxes["b1"][1]  # beside what it needs: no crossing


def test_a_step_of_many_instances_is_one_node_with_its_count() -> None:
    nodes = nodes_from(
        {"load": (), "score": ("load",)},
        {"load": "succeeded", "score": "running"},
        counts={"score": (730, 1000)},
    )
    svg = graph_svg(nodes, _STATUS_COLORS)
    drawn = Drawn(svg)
    assert drawn.texts["score"] == ["score", "730/1000"]
    assert drawn.texts["load"] == ["load"]
    assert drawn.fill["score"] == _STATUS_COLORS["running"]
    done = re.search(r'class="node-done" x="[\d.]+" y="[\d.]+" width="([\d.]+)"', svg)
    assert done is not None
    assert float(done[1]) == pytest.approx(0.73 * (drawn.boxes["score"][2] - 8), abs=0.1)
    labelled = Drawn(graph_svg([GraphNode("s", label="3 of 4 left")], _STATUS_COLORS))
    assert labelled.texts["s"] == ["s", "3 of 4 left"]


def _split(ctx: sv.StepContext) -> dict[str, list[int]]:
    return {"chunks": list(range(6))}


def _score(ctx: sv.StepContext) -> dict[str, int]:
    if ctx.item == 3:
        raise ValueError("item 3 is bad")
    return {"scores": ctx.item}


def test_a_mapped_step_of_a_real_run_is_one_node_with_its_instances_counted() -> None:
    wf = sv.Workflow(
        "graph-map",
        [
            sv.Step("split", _split, creates=["chunks"]),
            sv.Step("score", _score, map_over="chunks"),
        ],
        settings=sv.Settings(max_parallel=2, on_failure="continue"),
    )
    store = sv.MemoryStore()
    stored = store.load(sv.run(wf, store=store).run_id)
    assert "score[3]" in stored.steps  # the store keeps the instances as rows of their own
    drawn = Drawn(graph_svg(graph_of(wf, stored), _STATUS_COLORS))
    assert set(drawn.boxes) == {"split", "score"}  # one node for the map
    assert drawn.texts["score"] == ["score", "5/6"]
    assert drawn.status["score"] == "failed"
    assert set(drawn.edges) == {("split", "score")}


def test_ids_from_the_run_are_escaped_and_long_ones_cut_with_their_title_whole() -> None:
    long_id = "x" * 60
    svg = graph_svg([GraphNode("<b>&"), GraphNode(long_id, needs=("<b>&",))], _STATUS_COLORS)
    drawn = Drawn(svg)  # well-formed: nothing from the run broke out
    assert drawn.texts["<b>&"] == ["<b>&"]
    assert drawn.texts[long_id][0] == "x" * 27 + "…"
    assert f"<title>{long_id}: pending</title>" in svg


def test_too_many_steps_are_not_drawn_and_the_page_says_why() -> None:
    nodes = [GraphNode(f"s{i}") for i in range(MAX_NODES + 1)]
    text = graph_svg(nodes, _STATUS_COLORS)
    assert "<svg" not in text
    assert f"{MAX_NODES + 1} steps: too many to draw" in text
    assert "<svg" in graph_svg(nodes[:MAX_NODES], _STATUS_COLORS)


def test_a_cycle_given_by_mistake_is_drawn_without_hanging() -> None:
    drawn = Drawn(graph_svg([GraphNode("a", ("b",)), GraphNode("b", ("a",))], _STATUS_COLORS))
    assert set(drawn.boxes) == {"a", "b"}


def test_the_report_without_the_workflow_says_why_there_is_no_graph(
    run: tuple[sv.Workflow, StoredRun],
) -> None:
    wf, stored = run
    assert 'class="graph"' not in render_html(stored)
    assert "Not drawn: the workflow was not at hand" in render_html(stored)
    page = render_html(stored, graph=graph_of(wf, stored))
    assert 'class="graph"' in page
    assert not re.search(r"https?://|<(link|img|iframe)\b|\bsrc=", page)  # still self-contained


WF_FILE = """
id: filed
settings: {on_failure: continue}
steps:
  - {id: first, run: "graphsteps:one"}
  - {id: second, run: "graphsteps:one", needs: [first]}
"""


def test_the_report_command_draws_the_graph_while_the_workflow_file_is_unchanged(
    chdir_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (chdir_tmp / "graphsteps.py").write_text("def one(ctx):\n    return None\n")
    (chdir_tmp / "wf.yaml").write_text(WF_FILE)
    monkeypatch.syspath_prepend(str(chdir_tmp))
    assert main(["run", "wf.yaml", "--report", "at-end.html"]) == 0
    run_id = capsys.readouterr().out.split()[2]
    assert main(["report", run_id, "--html", "later.html"]) == 0
    for page in ("at-end.html", "later.html"):
        text = (chdir_tmp / page).read_text()
        assert 'data-from="first" data-to="second"' in text, page
    # A step added since: that graph would not be this run's.
    (chdir_tmp / "wf.yaml").write_text(WF_FILE + '  - {id: third, run: "graphsteps:one"}\n')
    assert main(["report", run_id, "--html", "changed.html"]) == 0
    changed = (chdir_tmp / "changed.html").read_text()
    assert 'class="graph"' not in changed
    assert "Not drawn" in changed


# -- in a real browser ------------------------------------------------------------------

#: Measures, in the browser, each node's box and its text as laid out there.
_MEASURE = """<script>(function(){var out=[];
document.querySelectorAll('svg.graph .node').forEach(function(g){
var r=g.querySelector('rect').getBoundingClientRect();
var t=g.querySelector('text').getBoundingClientRect();
out.push([g.getAttribute('data-step'),r.left,r.top,r.width,r.height,t.left,t.width]);});
var p=document.createElement('pre');p.id='measured';p.textContent=JSON.stringify(out);
document.body.appendChild(p);})();</script></body>"""


@pytest.mark.realtime
def test_in_chromium_each_id_fits_its_box_and_no_boxes_overlap(
    run: tuple[sv.Workflow, StoredRun], tmp_path: Path
) -> None:
    need_chromium()
    wf, stored = run
    nodes = [
        *graph_of(wf, stored),
        GraphNode("a_rather_long_step_name_w", needs=("lint",), count=(730, 1000)),
    ]
    page = tmp_path / "report.html"
    page.write_text(render_html(stored, graph=nodes).replace("</body>", _MEASURE))
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom, flags=re.DOTALL)
    assert found, dom[-2000:]
    measured = json.loads(found[1])
    assert sorted(m[0] for m in measured) == sorted(n.id for n in nodes)
    for step, left, _, width, height, text_left, text_width in measured:
        assert width > 0, step
        assert height > 0, step
        assert left < text_left, step
        assert text_left + text_width < left + width, step  # the id fits, with room
    for i, a in enumerate(measured):
        for b in measured[i + 1 :]:
            apart = (a[1] + a[3] <= b[1] or b[1] + b[3] <= a[1] or a[2] + a[4] <= b[2]) or b[2] + b[
                4
            ] <= a[2]
            assert apart, (a[0], b[0])


@pytest.mark.realtime
def test_report_with_its_graph_renders_in_headless_chromium(
    run: tuple[sv.Workflow, StoredRun], tmp_path: Path
) -> None:
    need_chromium()
    wf, stored = run
    page = write_html(stored, tmp_path / "report.html", graph=graph_of(wf, stored))
    data = screenshot(page, tmp_path / "shot.png", tmp_path, env=os.environ)
    assert len(data) > 20_000


def _chromium(args: list[str], tmp_path: Path) -> str:
    return chromium(
        args, tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=45
    )
