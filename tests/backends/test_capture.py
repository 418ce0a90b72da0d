"""Output capture's parts: the bounded log, routing by context, the child's frames, settings."""

from __future__ import annotations

import asyncio
import logging
import random
import sys
import threading
from typing import Any

import pytest

import stepvisor as sv
from stepvisor import config
from stepvisor.backends import _capture
from stepvisor.backends._capture import CURRENT, AttemptLog, Current, cut_marker, install
from stepvisor.backends._frames import MAGIC, frame
from stepvisor.backends.process._output import ChildOutput
from stepvisor.context import AttemptControl
from stepvisor.errors import InvalidSettingError
from stepvisor.store.memory import MemoryStore
from stepvisor.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests.store.test_store_sqlite import raw


def attempt_of(log: AttemptLog) -> Current:
    """What a backend puts in ``CURRENT`` for an attempt whose log is ``log``."""
    control = AttemptControl()
    control.capture = _capture.Capture("store", log.limit)
    control.log = log
    return (control, log.step_id, log.attempt)


def expected(data: bytes, limit: int) -> str:
    """What a log of ``data`` must read: all of it, or its head and tail with the cut marked."""
    if len(data) <= limit:
        return data.decode("utf-8", "replace")
    head, keep = limit // 2, limit - limit // 2
    cut = len(data) - head - keep
    return (
        data[:head].decode("utf-8", "replace")
        + cut_marker(cut, limit)
        + data[len(data) - keep :].decode("utf-8", "replace")
    )


@pytest.mark.parametrize("total", [0, 100, 1024, 1025, 5000, 300_000])
def test_a_log_is_what_was_written_or_its_head_and_tail_with_the_cut_marked(total: int) -> None:
    rng = random.Random(total)
    log = AttemptLog("s", 1, limit=1024, tee=False)
    pieces: list[str] = []
    written = 0
    while written < total:
        n = min(total - written, rng.choice([1, 7, 80, 4000, 70_000]))
        piece = "".join(rng.choice("abc\n") for _ in range(min(n, 50))) * (n // 50 + 1)
        piece = piece[:n]
        pieces.append(piece)
        log.write(piece)
        written += n
        if rng.random() < 0.3:  # read while it grows: never changes what is kept
            log.text()
    log.finish()
    text, cut = log.render()
    data = "".join(pieces).encode()
    assert text == expected(data, 1024)
    assert cut == max(0, len(data) - 1024)


def test_an_attempt_that_writes_nothing_gets_no_log() -> None:
    install()
    control = AttemptControl()
    control.capture = _capture.Capture("store", 4096)
    token = CURRENT.set((control, "quiet", 1))
    try:
        assert control.log is None
        print("first words")
    finally:
        CURRENT.reset(token)
    made: AttemptLog | None = getattr(control, "log")  # noqa: B009 - mypy narrowed it
    assert made is not None
    assert (made.step_id, made.attempt) == ("quiet", 1)
    assert made.text() == "first words\n"


def test_bytes_that_are_not_utf8_are_replaced_and_never_raise() -> None:
    log = AttemptLog("s", 1, limit=1024, tee=False)
    log.write("lone surrogate \udcff and \ud800 here\n")
    text = log.text()
    assert text.startswith("lone surrogate ")
    assert "\ufffd" in text
    assert text.endswith(" here\n")


def test_threads_with_their_own_context_never_get_each_others_lines() -> None:
    install()
    logs = [AttemptLog(f"t{i}", 1, limit=1 << 20, tee=False) for i in range(4)]
    barrier = threading.Barrier(len(logs))

    def step(log: AttemptLog) -> None:
        token = CURRENT.set(attempt_of(log))
        try:
            barrier.wait(timeout=10)
            for i in range(2000):
                print(f"{log.step_id} {i}")
        finally:
            CURRENT.reset(token)

    threads = [threading.Thread(target=step, args=(log,)) for log in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for log in logs:
        log.finish()
        assert log.text() == "".join(f"{log.step_id} {i}\n" for i in range(2000))


def test_async_tasks_on_one_thread_keep_their_own_lines() -> None:
    install()
    logs = [AttemptLog(f"a{i}", 1, limit=1 << 20, tee=False) for i in range(3)]

    async def step(log: AttemptLog) -> None:
        CURRENT.set(attempt_of(log))  # the task's own copy of the context
        for i in range(50):
            print(f"{log.step_id} {i}")
            await asyncio.sleep(0)  # the tasks interleave line by line

    async def main() -> None:
        await asyncio.gather(*(step(log) for log in logs))

    asyncio.run(main())
    assert CURRENT.get() is None
    for log in logs:
        assert log.text() == "".join(f"{log.step_id} {i}\n" for i in range(50))


def test_a_record_made_in_an_attempt_is_kept_and_names_its_step() -> None:
    install()
    log = AttemptLog("rec", 3, limit=1 << 20, tee=False)
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger = logging.getLogger("test_capture.records")
    handler = Keep()
    logger.addHandler(handler)
    try:
        token = CURRENT.set(attempt_of(log))
        try:
            logger.warning("hello %s", "there")
        finally:
            CURRENT.reset(token)
        logger.warning("outside")  # no attempt: nothing kept, no step named
    finally:
        logger.removeHandler(handler)
    assert "WARNING test_capture.records: hello there\n" in log.text()
    assert "outside" not in log.text()
    assert [getattr(r, "stepvisor_step", None) for r in seen] == ["rec", None]
    assert getattr(seen[0], "stepvisor_attempt", None) == 3


def test_tee_shows_whole_lines_prefixed_by_the_step() -> None:
    shown: list[str] = []
    _capture.TEE_TO[:] = [shown.append]
    try:
        log = AttemptLog("teed", 1, limit=1024, tee=True)
        log.write("par", sys.stdout)
        assert shown == []  # not a whole line yet
        log.write("tial\nsecond\nthird", sys.stdout)
        log.finish()
    finally:
        _capture.TEE_TO.clear()
    assert "".join(shown) == "[teed] partial\n[teed] second\n[teed] third\n"
    assert log.text() == "partial\nsecond\nthird"


def _frames_stream() -> bytes:
    record = b'{"name": "lib", "levelno": 30, "levelname": "WARNING", "msg": "m", "created": 0}'
    return (
        b"first line\n"
        + b"\x00 not a frame \x00\x1e\n"
        + frame(b"R", record)
        + "é\n".encode()
        + frame(b"E", b"run\x00s\x001")
        + b"next attempt\n"
    )


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000])
def test_the_childs_output_parses_the_same_however_it_is_cut(chunk: int) -> None:
    output = ChildOutput()
    log = AttemptLog("s", 1, limit=1 << 20, tee=False)
    output.bind(attempt_of(log))
    data = _frames_stream()
    for start in range(0, len(data), chunk):
        output.feed(data[start : start + chunk])
    assert ("run", "s", 1) in output.ended
    text = log.text()
    assert text.startswith("first line\n\x00 not a frame \x00\x1e\n")
    assert " WARNING lib: m\n" in text
    assert text.endswith("é\n")
    assert "next attempt" not in text  # after the end mark: held for the next attempt
    after = AttemptLog("s", 2, limit=1 << 20, tee=False)
    output.bind(attempt_of(after))
    assert after.text() == "next attempt\n"
    assert MAGIC not in text.encode()


def test_settings_capture_and_log_limit_are_checked_and_resolved() -> None:
    with pytest.raises(InvalidSettingError, match="capture must be 'tee'"):
        sv.Settings(capture="loud")
    with pytest.raises(InvalidSettingError, match="log_limit must be a whole number"):
        sv.Settings(log_limit=10)
    resolved = config.resolve(None, None, environ={"STEPVISOR_CAPTURE": "store"})
    assert (resolved.capture, resolved.log_limit) == ("store", 1 << 20)
    resolved = config.resolve(sv.Settings(log_limit=4096), {"capture": "off"}, environ={})
    assert (resolved.capture, resolved.log_limit) == ("off", 4096)


def _chatty(ctx: sv.StepContext) -> None:
    print("x" * 3000)


def test_the_log_limit_keeps_head_and_tail_in_the_result_and_store(tmp_path: Any) -> None:
    db = tmp_path / "runs.db"
    wf = sv.Workflow("limited", [sv.Step("big", _chatty)])
    result = sv.run(wf, store=str(db), log_limit=1024, capture="store")
    assert result.logs("big") == expected(("x" * 3000 + "\n").encode(), 1024)
    with SQLiteStore(db, create=False) as store:
        assert store.list_logs(result.run_id)[0].cut == 3001 - 1024
        assert store.load_log(result.run_id, "big", 1) == result.logs("big")


def test_a_run_given_no_store_keeps_its_logs_in_its_result() -> None:
    result = sv.run(sv.Workflow("unkept", [sv.Step("big", _chatty)]), capture="store")
    assert result.logs("big") == "x" * 3000 + "\n"
    with pytest.raises(KeyError, match="no step 'nope'"):
        result.logs("nope")


def test_a_memory_store_keeps_logs_too() -> None:
    store = MemoryStore()
    result = sv.run(sv.Workflow("mem", [sv.Step("big", _chatty)]), store=store, capture="store")
    assert store.load_log(result.run_id, "big", 1) == "x" * 3000 + "\n"
    assert [(e.step_id, e.attempt, e.chars) for e in store.list_logs(result.run_id)] == [
        ("big", 1, 3001)
    ]


def _binary(ctx: sv.StepContext) -> None:
    print("text first")
    sys.stdout.buffer.write(b"raw bytes \xff\n")
    print("text after")


def test_a_process_step_writing_bytes_to_stdout_keeps_them_in_order() -> None:
    wf = sv.Workflow("bytes", [sv.Step("b", _binary, executor="process")])
    result = sv.run(wf, capture="store")
    assert result.ok, result.error
    assert result.logs("b") == "text first\nraw bytes \ufffd\ntext after\n"


def test_a_store_from_before_logs_gets_their_table_and_keeps_its_runs(tmp_path: Any) -> None:
    db = tmp_path / "runs.db"
    old = sv.run(sv.Workflow("old", [sv.Step("big", _chatty)]), store=str(db), capture="off")
    with raw(db) as conn:  # as schema v3 left it: no attempt_logs table (nor v5's cache)
        conn.execute("DROP TABLE attempt_logs")
        for table in ("cache_entries", "cache_payloads"):
            conn.execute(f"DROP TABLE {table}")
        for column in ("reused_from", "cache_note"):
            conn.execute(f"ALTER TABLE steps DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        conn.execute("PRAGMA user_version = 3")
    with SQLiteStore(db) as store:
        assert store.list_logs(old.run_id) == []
        assert store.load(old.run_id).steps["big"].status is sv.StepStatus.SUCCEEDED
    result = sv.run(sv.Workflow("new", [sv.Step("big", _chatty)]), store=str(db), capture="store")
    with SQLiteStore(db, create=False) as store:
        assert store.load_log(result.run_id, "big", 1) == "x" * 3000 + "\n"
    with raw(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


_RELEASE = threading.Event()


def _deaf(ctx: sv.StepContext) -> None:
    print("not listening", flush=True)
    _RELEASE.wait(20)  # deaf to its deadline: it is abandoned


@pytest.mark.realtime
def test_an_abandoned_thread_step_has_its_stack_in_its_error_and_its_log() -> None:
    _RELEASE.clear()
    try:
        wf = sv.Workflow("deaf", [sv.Step("deaf", _deaf, timeout=0.2)])
        result = sv.run(wf, kill_grace=0.2, capture="store")
    finally:
        _RELEASE.set()  # the abandoned thread ends now
    attempt = result.steps["deaf"].attempts[-1]
    assert (attempt.outcome, attempt.note) == ("timed_out", "abandoned")
    for text in (attempt.error_traceback or "", result.logs("deaf")):
        assert "Stack at the deadline (most recent call last):" in text
        assert "in _deaf\n    _RELEASE.wait(20)" in text
    assert result.logs("deaf").startswith("not listening\n")


def _say(ctx: sv.StepContext) -> None:
    print(f"said by {ctx.run_id}", flush=True)


def test_a_warm_child_switches_capture_off_and_on_between_runs(
    capfd: pytest.CaptureFixture[str],
) -> None:
    wf = sv.Workflow("say", [sv.Step("s", _say, executor="process")])
    with sv.Engine(max_parallel=1) as engine:
        kept = engine.run(wf, capture="store", run_id="kept-1")
        loose = engine.run(wf, capture="off", run_id="loose-2")
        again = engine.run(wf, capture="store", run_id="kept-3")
    assert kept.logs("s") == "said by kept-1\n"
    assert loose.logs("s") == ""
    assert again.logs("s") == "said by kept-3\n"
    shown = capfd.readouterr().out
    assert "said by loose-2\n" in shown  # uncaptured: the program's own stdout, as before
    assert "kept-1" not in shown
    assert "kept-3" not in shown
