"""The benchmark charts: PNG files drawn from the harness's rows, whole or not at all."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from benchmarks import charts, harness
from benchmarks.harness import Row, Scenario

figure = pytest.importorskip(
    "matplotlib.figure",
    reason="the charts need matplotlib, in the bench extra: pip install -e '.[bench]'",
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(scenario: str, metric: str, system: str, value: float | None, **kw: Any) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "system": system,
        "metric": metric,
        "value": value,
        "unit": "µs",
        "status": "ok",
        **kw,
    }


ROWS = [
    _row("overhead", "per step, threads", "stepvisor", 17.0),
    _row("overhead", "per step, threads", "ThreadPoolExecutor(8)", 7.5),
    _row("overhead", "per step, threads", "Ray tasks (local)", 450.0),  # a log axis
    _row("overhead", "per step, threads", "Dask", None, status="not installed"),
    _row("overhead", "per step, processes", "stepvisor", 52.0),
    _row("overhead", "per step, processes", "ProcessPoolExecutor(2)", 71.0),
    _row("cancel", "median", "stepvisor", 69.0),
    _row("cancel", "median", "pool", None, status="failed", note="OSError: boom"),
    _row("makespan", "m", "stepvisor", 1.0),  # a scenario with no chart
]


def _png_size(path: Path) -> tuple[int, int]:
    """The width and height of a PNG, after checking its chunks' CRCs through to IEND."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    pos, size, kinds = len(PNG_SIGNATURE), (0, 0), []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, (path, kind)
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR", kinds
    assert kinds[-1] == b"IEND", kinds
    return size


def test_each_charted_scenario_with_rows_becomes_one_valid_png_and_nothing_else(
    tmp_path: Path,
) -> None:
    written = charts.write_charts(ROWS, tmp_path / "out")
    assert written == [tmp_path / "out" / "overhead.png", tmp_path / "out" / "cancel.png"]
    assert sorted(os.listdir(tmp_path / "out")) == ["cancel.png", "overhead.png"]  # no temp file
    width, height = _png_size(written[0])
    assert width > 500
    assert height > _png_size(written[1])[1]  # six bars in two panels against two in one
    assert written[0].stat().st_mode & 0o777 == 0o644


def test_the_same_rows_give_the_same_bytes(tmp_path: Path) -> None:
    first = charts.write_charts(ROWS, tmp_path / "a")
    again = charts.write_charts(ROWS, tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]


def test_a_chart_that_fails_half_written_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "overhead.png").write_bytes(b"the old chart")

    def half_then_fail(self: Any, fh: Any, **kw: Any) -> None:
        fh.write(PNG_SIGNATURE)
        raise OSError("disk full")

    monkeypatch.setattr(figure.Figure, "savefig", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        charts.write_charts(ROWS, tmp_path)
    assert os.listdir(tmp_path) == ["overhead.png"]
    assert (tmp_path / "overhead.png").read_bytes() == b"the old chart"


def test_the_harness_writes_the_charts_beside_its_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def run(*, quick: bool) -> list[Row]:
        return [
            Row(scenario="cancel", system=system, metric="median", value=value, unit="ms")
            for system, value in [("stepvisor", 70.0), ("ProcessPoolExecutor(8)", 3900.0)]
        ]

    fake = Scenario("cancel", "cancel latency", 1, run, "tests.fake")
    monkeypatch.setattr(harness, "discover", lambda: [fake])
    out = tmp_path / "results" / "figures.json"
    assert harness.main(["--in-process", "--out", str(out)]) == 0
    assert sorted(os.listdir(out.parent)) == ["cancel.png", "figures.json"]
    _png_size(out.parent / "cancel.png")
    assert f"chart written to {out.parent / 'cancel.png'}" in capsys.readouterr().out


def test_charts_are_drawn_again_from_a_json_already_written(tmp_path: Path) -> None:
    figures = tmp_path / "latest.json"
    figures.write_text(json.dumps({"rows": ROWS}))
    assert charts.main([str(figures), "--out", str(tmp_path / "again")]) == 0
    assert sorted(os.listdir(tmp_path / "again")) == ["cancel.png", "overhead.png"]
