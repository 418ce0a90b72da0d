"""The HTML report of a stored run: one self-contained page to look at after the fact.

The page answers "what ran where, when, and how did it end": a summary (status,
counts, duration, seed, settings), the workflow's graph with each step coloured by
its status (:mod:`stepvisor.cli._graph`; drawn when the caller knows the
workflow), a timeline with one row per worker slot and one bar per attempt
colored by its outcome, and a table of steps whose rows open to show every
attempt with its error and traceback.

A mapped step is one row of that table with its instances' counts; the row
opens to a table of its instances (at most ``_INSTANCE_ROWS``: every one that
did not succeed first), each opening to its attempts.  Its instances' bars
carry the step's id, so hovering one lights up the whole map, and a click opens
the step's row and the instance's.

It is one file with inline CSS, SVG and a few lines of JavaScript, and a
Content-Security-Policy that forbids loading anything, so it can be mailed,
attached to a CI run or opened offline.  Every piece of text that comes from the
run (ids, error messages, tracebacks, settings) goes through ``html.escape``::

    StoredRun ─▶ _Attempt rows (one per attempt, restored steps left out)
              ─▶ summary + settings ─┐
    workflow  ─▶ SVG graph ──────────┤
              ─▶ SVG timeline ───────┼─▶ HTML page
              ─▶ steps table ────────┘
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stepvisor.cli._graph import GraphNode, graph_of, graph_svg
from stepvisor.cli._maps import Group, count_text, group_steps
from stepvisor.core.state import AttemptRecord, StepRecord, StepStatus
from stepvisor.store.base import StoredRun

__all__ = ["OUTCOME_COLORS", "GraphNode", "graph_of", "render_html", "write_html"]

#: Bar colors by attempt outcome (``None``: the attempt never ended).
OUTCOME_COLORS: Final[Mapping[str, str]] = {
    "succeeded": "#2f9e62",
    "failed": "#d64545",
    "timed_out": "#9b5de5",
    "cancelled": "#e09f3e",
    "crashed": "#7a1f1f",
    "unfinished": "#5b8def",
}
_STATUS_COLORS: Final[Mapping[str, str]] = {
    **OUTCOME_COLORS,
    "running": "#5b8def",
    "interrupted": "#7a1f1f",
    "skipped": "#9aa1ab",
    "pending": "#9aa1ab",
    "waiting_retry": "#e09f3e",
}

# Timeline geometry, in SVG user units (the SVG scales to the page width).
_WIDTH: Final = 1100
_GUTTER: Final = 64
_PAD_RIGHT: Final = 16
_AXIS: Final = 26
_ROW: Final = 30
_BAR: Final = 20
_CHAR: Final = 6.6  # average width of a 11px sans-serif character


#: Step statuses in the order the summary counts them.
_ORDER: Final = tuple(s.value for s in StepStatus)
#: Instance rows listed under one mapped step (``stepvisor status RUN STEP`` lists all).
_INSTANCE_ROWS: Final = 1000
#: Attempts the timeline draws at most (see ``_drawn``).
_BARS: Final = 5000


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _seconds(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.2f} s"
    minutes, seconds = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


def _when(value: float | None) -> str:
    if value is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(value))


@dataclass(frozen=True, slots=True)
class _Attempt:
    step_id: str
    of: int
    record: AttemptRecord
    start: float
    end: float
    #: The mapped step an instance's attempt belongs to (``None`` for a plain step).
    group: str | None = None

    @property
    def outcome(self) -> str:
        return self.record.outcome or "unfinished"

    def hover(self) -> str:
        rec = self.record
        took = rec.duration if rec.duration is not None else self.end - self.start
        lines = [
            f"{self.step_id} · attempt {rec.number} of {self.of}",
            f"{self.outcome} after {_seconds(took)}",
            f"worker {rec.worker or '-'}",
        ]
        if rec.error_type:
            lines.append(f"{rec.error_type}: {rec.error_message or ''}")
        if rec.note:
            lines.append(rec.note)
        return "\n".join(lines)


def _attempts(stored: StoredRun, *, now: float) -> list[_Attempt]:
    out: list[_Attempt] = []
    ended = stored.info.ended
    for group in group_steps(stored.steps):
        mapped = group.record.step_id if group.mapped else None
        for record in (group.record, *group.instances):
            if record.restored:
                continue  # ran in an earlier session of the run; listed in the table only
            for rec in record.attempts:
                end = rec.ended if rec.ended is not None else (ended or now)
                out.append(
                    _Attempt(record.step_id, len(record.attempts), rec, rec.started, end, mapped)
                )
    return out


def _worker_key(name: str) -> tuple[str, int, str]:
    match = re.fullmatch(r"(\D*)(\d+)", name)
    return (match[1], int(match[2]), "") if match else (name, 0, name)


def _ticks(span: float) -> tuple[float, list[float]]:
    """A 1-2-5 tick step giving about eight ticks over ``span`` seconds."""
    raw = max(span, 1e-3) / 8
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    count = int(span / step + 1e-9)
    return step, [i * step for i in range(count + 1)]


def _tick_label(value: float, step: float) -> str:
    decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
    return f"{value:.{decimals}f} s"


def _timeline(attempts: Sequence[_Attempt]) -> str:
    if not attempts:
        return '<p class="muted">No attempts ran in this session of the run.</p>'
    t0 = min(a.start for a in attempts)
    span = max(max(a.end for a in attempts) - t0, 1e-3)
    workers = sorted({a.record.worker or "-" for a in attempts}, key=_worker_key)
    row = {w: i for i, w in enumerate(workers)}
    inner = _WIDTH - _GUTTER - _PAD_RIGHT
    height = _AXIS + _ROW * len(workers) + 8

    def x(t: float) -> float:
        return _GUTTER + (t - t0) / span * inner

    parts = [
        f'<svg class="timeline" viewBox="0 0 {_WIDTH} {height}" width="{_WIDTH}" '
        f'height="{height}" role="img" aria-label="timeline of attempts by worker">'
    ]
    step, ticks = _ticks(span)
    for tick in ticks:
        tx = x(t0 + tick)
        parts.append(
            f'<line class="grid" x1="{tx:.1f}" y1="{_AXIS - 6}" x2="{tx:.1f}" y2="{height - 4}"/>'
            f'<text class="tick" x="{tx:.1f}" y="{_AXIS - 10}">{_e(_tick_label(tick, step))}</text>'
        )
    for worker, i in row.items():
        y = _AXIS + i * _ROW
        parts.append(
            f'<rect class="lane" x="{_GUTTER}" y="{y}" width="{inner}" height="{_ROW}"/>'
            f'<text class="worker" x="{_GUTTER - 8}" y="{y + _ROW / 2 + 4}">{_e(worker)}</text>'
        )
    drawn, note = _drawn(attempts)
    for a in drawn:
        parts.append(_bar(a, x, _AXIS + row[a.record.worker or "-"] * _ROW))
    parts.append("</svg>")
    return "".join(parts) + note


def _drawn(attempts: Sequence[_Attempt]) -> tuple[list[_Attempt], str]:
    """The bars to draw, in start order, and a note saying what was left out.

    Up to ``_BARS`` every attempt is drawn.  Past that (a big map: a hundred
    thousand bars would make a page of tens of megabytes, drawn a fraction of
    a pixel wide), every plain step's attempt and every attempt that did not
    succeed are drawn, and of the instances' attempts that succeeded an even
    sample, every k-th in start order, fills what is left.
    """
    ordered = sorted(attempts, key=lambda a: (a.start, a.step_id))
    if len(ordered) <= _BARS:
        return ordered, ""
    common = [a for a in ordered if a.group is not None and a.outcome == "succeeded"]
    room = max(0, _BARS - (len(ordered) - len(common)))
    every = max(1, math.ceil(len(common) / room)) if room else 0
    sampled = set(map(id, common[::every])) if every else set()
    drawn = [a for a in ordered if a.group is None or a.outcome != "succeeded" or id(a) in sampled]
    note = (
        f'<p class="muted">{len(drawn)} of {len(ordered)} attempts drawn: every step\'s and every '
        "one that did not succeed; of the instances' attempts that succeeded, "
        + (f"every {every}{_ordinal(every)} in start order." if every else "none.")
        + "</p>"
    )
    return drawn, note


def _ordinal(n: int) -> str:
    if 10 <= n % 100 <= 20:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


def _bar(a: _Attempt, x: Callable[[float], float], lane_y: float) -> str:
    left = x(a.start)
    width = max(x(a.end) - left, 2.0)
    y = lane_y + (_ROW - _BAR) / 2
    wait = ""
    if a.record.delay_after:  # the backoff before the next attempt, as a dashed tail
        tail = x(a.end + a.record.delay_after)
        wait = (
            f'<line class="wait" x1="{left + width:.1f}" y1="{y + _BAR / 2:.1f}" '
            f'x2="{tail:.1f}" y2="{y + _BAR / 2:.1f}"/>'
        )
    label = a.step_id if a.record.number == 1 else f"{a.step_id} #{a.record.number}"
    # An instance's bar is its step's (hover, click) and names the instance too.
    ids = f'data-step="{_e(a.group or a.step_id)}" data-outcome="{_e(a.outcome)}"'
    if a.group is not None:
        ids += f' data-instance="{_e(a.step_id)}"'
    text = ""
    if width > len(label) * _CHAR + 8:
        text = (
            f'<text class="label" x="{left + 4:.1f}" y="{y + _BAR / 2 + 4:.1f}">{_e(label)}</text>'
        )
    return (
        f'<g class="bar" {ids}>'
        f"<title>{_e(a.hover())}</title>{wait}"
        f'<rect x="{left:.1f}" y="{y:.1f}" width="{width:.1f}" height="{_BAR}" rx="3" '
        f'fill="{OUTCOME_COLORS.get(a.outcome, "#888")}"/>{text}</g>'
    )


def _legend(attempts: Iterable[_Attempt]) -> str:
    seen = Counter(a.outcome for a in attempts)
    items = [
        f'<span class="key"><i style="background:{color}"></i>{_e(name.replace("_", " "))}'
        f" ({seen[name]})</span>"
        for name, color in OUTCOME_COLORS.items()
        if seen[name] or name in ("succeeded", "failed", "timed_out")
    ]
    return f'<div class="legend">{"".join(items)}</div>'


def _badge(status: str) -> str:
    color = _STATUS_COLORS.get(status, "#888")
    return f'<span class="badge" style="background:{color}">{_e(status.replace("_", " "))}</span>'


def _summary(stored: StoredRun, attempts: Sequence[_Attempt], *, now: float) -> str:
    info = stored.info
    groups = group_steps(stored.steps)
    counts = Counter(g.record.status.value for g in groups)
    kept = sum(1 for g in groups if g.record.restored)
    kept_instances = sum(1 for g in groups for r in g.instances if r.restored)
    retries = sum(max(0, len(r.attempts) - 1) for r in stored.steps.values() if not r.restored)
    duration = (info.ended if info.ended is not None else now) - info.started
    facts: list[tuple[str, str]] = [
        ("run", _e(info.run_id)),
        ("workflow", _e(info.workflow_id)),
        ("status", _badge(info.status.value)),
        ("steps", _counted(counts)),
        ("attempts", f"{len(attempts)} ({retries} {'retry' if retries == 1 else 'retries'})"),
        ("started", _e(_when(info.started))),
        ("ended", _e(_when(info.ended))),
        ("duration", _e(_seconds(duration))),
        ("seed", _e(info.seed)),
        ("workflow file", _e(info.source or "-")),
    ]
    mapped = [g for g in groups if g.mapped]
    if mapped:
        tally: Counter[str] = Counter()
        for g in mapped:
            tally.update(g.counts())
        total = sum(g.size or 0 for g in mapped)
        facts.insert(4, ("instances", f"{total}" + (f": {_counted(tally)}" if total else "")))
    if kept or kept_instances:
        also = f" and {kept_instances} instances" if kept_instances else ""
        facts.append(("kept", f"{kept} steps{also} succeeded in an earlier session (not drawn)"))
    if info.error:
        facts.append(("error", f'<span class="err">{_e(info.error)}</span>'))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


def _counted(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{counts[s]} {_e(s.replace('_', ' '))}" for s in _ORDER if counts.get(s))


def _settings(settings: Mapping[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{_e(name)}</th><td><code>{_e(json.dumps(value, default=str))}</code></td></tr>"
        for name, value in settings.items()
    )
    return f'<table class="facts settings">{rows}</table>'


def _step_rows(steps: Iterable[StepRecord]) -> str:
    out = []
    for group in group_steps({record.step_id: record for record in steps}):
        sid = _e(group.record.step_id)
        if group.mapped:
            out.append(_mapped_row(group))
        else:
            out.append(_row(group.record, f'class="step" id="step-{sid}" data-step="{sid}"'))
    return "".join(out)


def _row(record: StepRecord, attrs: str) -> str:
    last = record.last_attempt
    total = sum(a.duration or 0.0 for a in record.attempts)
    error = f"{last.error_type}: {last.error_message or ''}" if last and last.error_type else ""
    workers = ", ".join(dict.fromkeys(a.worker or "-" for a in record.attempts))
    details = "".join(_attempt_detail(a) for a in record.attempts) or "<p>no attempts</p>"
    note = f'<p class="muted">{_e(record.note)}</p>' if record.note else ""
    kept = ' <span class="muted">(kept)</span>' if record.restored else ""
    if record.reused_from is not None:
        kept = ' <span class="muted">(reused)</span>'
    if record.cache_note is not None:  # why a cached step was reused or computed
        note += f'<p class="muted cache">{_e(record.cache_note)}</p>'
    err_class = ' class="err"' if error else ""
    return (
        f"<tr {attrs}>"
        f"<td><code>{_e(record.step_id)}</code>{kept}</td>"
        f"<td>{_badge(record.status.value)}</td><td>{record.attempt_count}</td>"
        f'<td class="num">{_e(_seconds(total if record.attempts else None))}</td>'
        f"<td>{_e(workers)}</td>"
        f"<td><details><summary{err_class}>"
        f"{_e(error) or 'attempts'}</summary>"
        f"{note}{details}</details></td></tr>"
    )


def _mapped_row(group: Group) -> str:
    """A mapped step: its counts, folded over a table of its instances (each opens too).

    Its time is the wall time from its first instance's start to its last one's end.
    """
    assert group.size is not None
    record = group.record
    sid = _e(record.step_id)
    attempts = [a for r in group.instances for a in r.attempts]
    ends = [a.ended for a in attempts if a.ended is not None]
    span = max(ends) - min(a.started for a in attempts) if ends else None
    workers = len({a.worker for a in attempts if a.worker})
    shown = _shown(group.instances)
    rows = "".join(
        _row(r, f'class="instance" id="step-{_e(r.step_id)}" data-instance="{_e(r.step_id)}"')
        for r in shown
    )
    left = len(group.instances) - len(shown)
    more = (
        f'<p class="muted">{left} more instances that succeeded are not listed; '
        f"<code>stepvisor status RUN {sid}</code> lists every one.</p>"
        if left
        else ""
    )
    pending = group.size - len(group.instances)
    if pending:
        more += f'<p class="muted">{pending} instances never started (pending).</p>'
    failed = any(r.status.value in ("failed", "timed_out") for r in group.instances)
    err_class = ' class="err"' if failed else ""
    head = (
        "<thead><tr><th>instance</th><th>status</th><th>attempts</th><th>time</th>"
        "<th>workers</th><th>error / attempts</th></tr></thead>"
    )
    table = f'<table class="steps instances">{head}<tbody>{rows}</tbody></table>' if rows else ""
    return (
        f'<tr class="step mapped" id="step-{sid}" data-step="{sid}">'
        f'<td><code>{sid}</code> <span class="muted">(mapped)</span></td>'
        f"<td>{_badge(record.status.value)}</td><td>{len(attempts)}</td>"
        f'<td class="num">{_e(_seconds(span))}</td>'
        f"<td>{workers} {'worker' if workers == 1 else 'workers'}</td>"
        f"<td><details><summary{err_class}>"
        f"{_e(count_text(group.size, group.counts()))}</summary>"
        f"{table}{more}</details></td></tr>"
    )


def _shown(instances: Sequence[StepRecord]) -> list[StepRecord]:
    """At most ``_INSTANCE_ROWS`` instances, in index order: all that did not succeed first."""
    if len(instances) <= _INSTANCE_ROWS:
        return list(instances)
    keep = [i for i, r in enumerate(instances) if r.status is not StepStatus.SUCCEEDED]
    keep = keep[:_INSTANCE_ROWS]
    room = _INSTANCE_ROWS - len(keep)
    chosen = set(keep)
    for i in range(len(instances)):
        if room <= 0:
            break
        if i not in chosen:
            chosen.add(i)
            room -= 1
    return [instances[i] for i in sorted(chosen)]


def _attempt_detail(a: AttemptRecord) -> str:
    head = (
        f"#{a.number} {a.outcome or 'unfinished'} after {_seconds(a.duration)} "
        f"on {a.worker or '-'} (started {_when(a.started)})"
    )
    parts = [f"<p><b>{_e(head)}</b></p>"]
    if a.error_type:
        parts.append(f'<p class="err">{_e(a.error_type)}: {_e(a.error_message or "")}</p>')
    if a.note:
        parts.append(f'<p class="muted">{_e(a.note)}</p>')
    if a.error_traceback:
        parts.append(f"<pre>{_e(a.error_traceback)}</pre>")
    return "".join(parts)


_CSS: Final = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;
background:#f7f8fa}
h1{font-size:20px;margin:0 0 12px}h2{font-size:16px;margin:24px 0 8px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;padding:16px;margin-bottom:16px}
.cols{display:flex;gap:16px;flex-wrap:wrap}.cols>div{flex:1 1 420px}
table{border-collapse:collapse}.facts th{text-align:left;padding:2px 16px 2px 0;color:#5b6472;
font-weight:500;vertical-align:top}.facts td{padding:2px 0}
.steps{width:100%}.steps th,.steps td{text-align:left;padding:6px 8px;
border-bottom:1px solid #eceef2;vertical-align:top}.steps tr.hot{background:#fff6d6}
.num{white-space:nowrap}
.badge{color:#fff;border-radius:10px;padding:1px 8px;font-size:12px;white-space:nowrap}
.err{color:#b42318}.muted{color:#6b7280}pre{background:#f3f4f6;padding:8px;overflow:auto;
font-size:12px;max-height:300px}summary{cursor:pointer}
svg.timeline{width:100%;height:auto;font:11px system-ui,sans-serif}
.graphbox{overflow-x:auto}svg.graph{font:12px system-ui,sans-serif;display:block}
.edge{fill:none;stroke:#9aa1ab;stroke-width:1.4}.arrowhead{fill:#9aa1ab}
.node{cursor:pointer}.node text{fill:#fff;text-anchor:middle;pointer-events:none}
.node-id{font-weight:600}.node-count{font-size:11px}.node-done{fill:#fff;opacity:.8}
.node.dim{opacity:.3}.node.hot rect{stroke:#111;stroke-width:1.5}
.lane{fill:#fafbfc;stroke:#eef0f3}.grid{stroke:#e6e8ec}.tick{fill:#6b7280;text-anchor:middle}
.worker{fill:#374151;text-anchor:end;font-weight:600}.label{fill:#fff;pointer-events:none}
.wait{stroke:#e09f3e;stroke-width:2;stroke-dasharray:4 3}
.bar{cursor:pointer}.bar.dim{opacity:.25}.bar.hot rect{stroke:#111;stroke-width:1.5}
.legend{margin:8px 0 0}.key{margin-right:16px;white-space:nowrap}
.key i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;
vertical-align:-1px}
"""

# Hovering a bar or a graph node highlights every attempt of its step, its node and
# its table row; clicking it opens the row (and, for an instance of a mapped step, its
# own row).  No innerHTML: only classes and attributes change.
_JS: Final = """
(function(){
  var bars=document.querySelectorAll('.bar, .node');
  function mark(step,on){
    bars.forEach(function(b){
      var same=b.getAttribute('data-step')===step;
      b.classList.toggle('hot',on&&same);b.classList.toggle('dim',on&&!same);});
    document.querySelectorAll('tr.step').forEach(function(r){
      r.classList.toggle('hot',on&&r.getAttribute('data-step')===step);});
  }
  bars.forEach(function(b){
    var step=b.getAttribute('data-step');
    b.addEventListener('mouseenter',function(){mark(step,true);});
    b.addEventListener('mouseleave',function(){mark(step,false);});
    b.addEventListener('click',function(){
      var row=document.getElementById('step-'+step);
      if(row){row.querySelector('details').open=true;row.scrollIntoView({block:'center'});}
      var one=b.getAttribute('data-instance'),sub=one&&document.getElementById('step-'+one);
      if(sub){sub.querySelector('details').open=true;sub.scrollIntoView({block:'center'});}
    });
  });
})();
"""


def _output(logs: Mapping[tuple[str, int], str] | None) -> str:
    """What each attempt wrote, one folded block per attempt (``stepvisor logs`` too)."""
    if not logs:
        return ""
    blocks = "".join(
        f"<details><summary><code>{_e(step_id)}</code> attempt {attempt} "
        f'<span class="muted">({len(text.splitlines())} lines)</span></summary>'
        f"<pre>{_e(text)}</pre></details>"
        for (step_id, attempt), text in sorted(logs.items())
    )
    return (
        '<section><h2>Output</h2><p class="muted">What each attempt wrote to stdout and '
        "stderr, and the logging records it emitted, in order.</p>"
        f"{blocks}</section>"
    )


def _graph_section(graph: Sequence[GraphNode] | None) -> str:
    if graph is None:
        return (
            '<p class="muted">Not drawn: the workflow was not at hand when this report was '
            "written (<code>stepvisor report</code> draws it while the workflow file is where "
            "the run was started from).</p>"
        )
    return f'<div class="graphbox">{graph_svg(graph, _STATUS_COLORS)}</div>'


def render_html(
    stored: StoredRun,
    *,
    now: float | None = None,
    graph: Sequence[GraphNode] | None = None,
    logs: Mapping[tuple[str, int], str] | None = None,
) -> str:
    """The report page for ``stored`` as a string (``now`` ends unfinished attempts).

    ``graph`` is the workflow's steps as nodes (:func:`graph_of`, or built by the
    caller, e.g. one node with its count for a step of many instances); without
    it the page says why there is no graph.  ``logs`` are what each attempt wrote.
    """
    now = time.time() if now is None else now
    info = stored.info
    attempts = _attempts(stored, now=now)
    title = f"stepvisor · {info.workflow_id} · {info.run_id}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>Run <code>{_e(info.run_id)}</code> of <code>{_e(info.workflow_id)}</code>
{_badge(info.status.value)}</h1>
<section><h2>Summary</h2>{_summary(stored, attempts, now=now)}</section>
<section><h2>Graph</h2><p class="muted">Each step coloured by its status, an arrow from
what it needs; hover a step to find it in the timeline.</p>
{_graph_section(graph)}</section>
<section><h2>Timeline</h2><p class="muted">One row per worker slot, one bar per attempt
(a dashed tail is the wait before a retry); hover a bar for its step, attempt, duration
and error.</p>
{_timeline(attempts)}{_legend(attempts)}</section>
<section><h2>Steps</h2><table class="steps"><thead><tr><th>step</th><th>status</th>
<th>attempts</th><th>time</th><th>workers</th><th>error / attempts</th></tr></thead>
<tbody>{_step_rows(stored.steps.values())}</tbody></table></section>
{_output(logs)}
<section><h2>Settings</h2>{_settings(info.settings)}</section>
<p class="muted">Generated by stepvisor at {_e(_when(now))}.</p>
<script>{_JS}</script>
</body></html>
"""


def write_html(
    stored: StoredRun,
    path: str | os.PathLike[str],
    *,
    logs: Mapping[tuple[str, int], str] | None = None,
    graph: Sequence[GraphNode] | None = None,
) -> Path:
    """Write the report for ``stored`` to ``path`` (directories made); return its path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(stored, graph=graph, logs=logs)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target.resolve()
