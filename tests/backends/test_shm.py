"""Large values between process steps go through shared memory: once, read-only, never leaked.

Each step that looks at its input reports what backs it (a segment mapping in
its own /proc/self/maps), so the tests see the path a value took, not only
that it arrived.  The leak check (tests/conftest.py) also fails any test that
leaves a segment descriptor in this process or a name in /dev/shm.
"""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stepvisor as sv
from stepvisor.backends import _shm
from stepvisor.backends._wire import dump
from tests.conftest import REPO_ROOT, session_processes, wait_for
from tests.procfs import pid_gone
from tests.shmprobe import dev_shm_entries, segment_fds, segment_inodes, segment_maps

try:
    import numpy as np
except ImportError:  # pragma: no cover - the test extra installs it
    np = None  # type: ignore[assignment]

needs_numpy = pytest.mark.skipif(
    np is None, reason="numpy is not installed: pip install -e '.[test]' (the test extra has it)"
)

BIG = 2 * _shm.SHARE_MIN  # bytes: surely shared
SMALL = 1024


# -- steps (run in worker processes; module level, so the child imports them) ----------------


def _mapped() -> int:
    """Bytes of segments mapped in this process."""
    return sum(segment_maps().values())


def make_array(ctx: sv.StepContext) -> dict[str, Any]:
    n = ctx.params["n"]
    return {"a": np.arange(n, dtype=np.float64)}


def make_value(ctx: sv.StepContext) -> dict[str, Any]:
    return {"v": ctx.params["build"]()}


def read_sum(ctx: sv.StepContext) -> dict[str, Any]:
    """Sum the array; try to write it; say what backs it."""
    a = ctx.inputs["a"]
    try:
        a[0] = -1.0
        error = ""
    except (ValueError, TypeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return {
        f"sum_{ctx.step_id}": float(a.sum()),
        f"error_{ctx.step_id}": error,
        f"mapped_{ctx.step_id}": _mapped(),
    }


def echo_value(ctx: sv.StepContext) -> dict[str, Any]:
    """Return what the input was, as plain facts, and whether writing it worked."""
    v = ctx.inputs["v"]
    facts: dict[str, Any] = {"mapped": _mapped(), "type": type(v).__name__}
    facts["digest"] = pickle.dumps(v if not isinstance(v, memoryview) else v.tobytes())
    try:
        v[0] = 0
        facts["write"] = "ok"
    except (ValueError, TypeError) as exc:
        facts["write"] = f"{type(exc).__name__}: {exc}"
    return {f"facts_{ctx.step_id}": facts}


def crash_holding(ctx: sv.StepContext) -> None:
    assert _mapped() >= ctx.inputs["a"].nbytes
    os._exit(9)


def fail_once(ctx: sv.StepContext) -> dict[str, Any]:
    flag = Path(ctx.params["flag"])
    if flag.exists():
        raise RuntimeError("failing until the flag file is removed")
    return read_sum(ctx)


def make_arrays(ctx: sv.StepContext) -> dict[str, Any]:
    n = ctx.params["n"]
    return {"chunks": [np.arange(n, dtype=np.float64) + i for i in range(3)]}


def item_facts(ctx: sv.StepContext) -> dict[str, Any]:
    """What a mapped instance's item is: its sum, whether it is writable, what is mapped."""
    item = ctx.item
    return {
        "facts": (float(item.sum()), bool(item.flags.writeable), _mapped() >= item.nbytes),
        "doubled": item * 2,
    }


# -- helpers ---------------------------------------------------------------------------------


def data_workflow(n: int, readers: int = 2, reader: Any = read_sum, **params: Any) -> sv.Workflow:
    steps = [sv.Step("make", make_array, executor="process", params={"n": n})]
    steps += [
        sv.Step(f"r{i}", reader, needs=["make"], executor="process", params=params)
        for i in range(readers)
    ]
    return sv.Workflow("data", steps, settings=sv.Settings(max_parallel=2))


def value_workflow(build: Any) -> sv.Workflow:
    return sv.Workflow(
        "value",
        [
            sv.Step("make", make_value, executor="process", params={"build": build}),
            sv.Step("r0", echo_value, needs=["make"], executor="process"),
            sv.Step("r1", echo_value, needs=["make"], executor="process"),
        ],
    )


def children_segments() -> set[int]:
    return segment_inodes(list(session_processes()))


# -- the path a value takes ------------------------------------------------------------------


@needs_numpy
def test_a_large_array_is_shared_read_only_with_every_reader_and_the_parent(
    chdir_tmp: Path,
) -> None:
    n = BIG // 8
    result = sv.run(data_workflow(n, readers=3))
    assert result.ok, result.error
    expected = float(np.arange(n, dtype=np.float64).sum())
    for i in range(3):
        assert result.artifacts[f"sum_r{i}"] == expected  # the write did not go through
        assert result.artifacts[f"mapped_r{i}"] >= n * 8
        assert result.artifacts[f"error_r{i}"] == (
            "ValueError: assignment destination is read-only"
        )
    a = result.artifacts["a"]
    assert not a.flags.writeable
    with pytest.raises(ValueError, match="assignment destination is read-only"):
        a[0] = 1.0
    # The parent's value is a view on the segment: mapped here, no copy.
    assert sum(segment_maps().values()) >= a.nbytes
    assert _shm.held_fds() == 0  # the run ended: its descriptors are closed
    del a, result
    gc.collect()
    assert segment_maps() == {}  # the last view went, and the mapping with it


@needs_numpy
def test_mapped_instances_get_large_items_through_shared_memory_chained_too(
    chdir_tmp: Path,
) -> None:
    n = BIG // 8
    wf = sv.Workflow(
        "map-data",
        [
            sv.Step("split", make_arrays, executor="process", params={"n": n}, creates=["chunks"]),
            sv.Step("a", item_facts, executor="process", map_over="chunks", creates=["doubled"]),
            sv.Step("b", item_facts, executor="process", map_over="doubled", creates=["facts"]),
        ],
        settings=sv.Settings(max_parallel=2),
    )
    result = sv.run(wf)
    assert result.ok, result.error
    base = float(np.arange(n, dtype=np.float64).sum())
    # Read-only items mapped into the child: each went by a segment, not the pipe.
    assert result.artifacts["facts"] == [(2 * (base + i * n), False, True) for i in range(3)]
    del result
    gc.collect()
    assert _shm.held_fds() == 0


@needs_numpy
def test_a_small_array_keeps_the_pipe_and_makes_no_segment(chdir_tmp: Path) -> None:
    result = sv.run(data_workflow(SMALL // 8))
    assert result.ok, result.error
    assert result.artifacts["mapped_r0"] == 0
    assert result.artifacts["error_r0"] == ""  # a private copy, as before
    assert segment_maps() == {}


def test_a_small_value_is_pickled_once_and_whole() -> None:
    pickled, raws = _shm.dumps_sharing(b"x" * SMALL, lambda v, b: pickle.dumps(v, protocol=5))
    assert raws == []
    assert pickle.loads(pickled) == b"x" * SMALL


def _array(dtype: str, shape: tuple[int, ...], order: str = "C") -> Any:
    count = int(np.prod(shape))
    return np.arange(count).astype(dtype).reshape(shape, order=order)  # type: ignore[call-overload]


ARRAYS: dict[str, Callable[[], Any]] = {
    "float64 1-d": lambda: _array("float64", (BIG // 8,)),
    "int32 3-d": lambda: _array("int32", (64, 64, BIG // (4 * 64 * 64))),
    "complex128 Fortran order": lambda: _array("complex128", (512, BIG // (16 * 512)), "F"),
    "bool 2-d": lambda: _array("bool", (1024, BIG // 1024)),
    "uint8 strided (not contiguous)": lambda: _array("uint8", (BIG * 2,))[::2],
    "float32 transposed slice": lambda: _array("float32", (1024, 3 * BIG // 4096)).T[:, ::3],
    "structured": lambda: np.zeros(BIG // 12, dtype=[("x", "<i4"), ("y", "<f8")]),
}


@needs_numpy
@pytest.mark.parametrize("kind", sorted(ARRAYS))
def test_arrays_of_every_dtype_shape_and_layout_round_trip(kind: str, chdir_tmp: Path) -> None:
    original = ARRAYS[kind]()
    result = sv.run(value_workflow(ARRAYS[kind]))
    assert result.ok, result.error
    got = result.artifacts["v"]
    assert got.dtype == original.dtype
    assert got.shape == original.shape
    assert np.array_equal(got, original)
    facts = result.artifacts["facts_r0"]
    assert pickle.loads(facts["digest"]).tobytes() == original.tobytes()
    contiguous = original.flags.c_contiguous or original.flags.f_contiguous
    # Contiguous data comes back as a read-only view on the segment; another layout
    # pickles in band (a private, contiguous copy here), which the parent then
    # shares once with the readers: they all map it read-only either way.
    assert got.flags.writeable is not contiguous
    if contiguous:
        assert got.flags.f_contiguous == original.flags.f_contiguous
    assert facts["mapped"] >= original.nbytes
    assert facts["write"] == "ValueError: assignment destination is read-only"


def _bytes() -> bytes:
    return bytes(range(256)) * (BIG // 256)


def _bytearray() -> bytearray:
    return bytearray(_bytes())


def _memoryview() -> memoryview:
    return memoryview(bytearray(_bytes())).cast("I", (16, BIG // 64))


def _small_memoryview() -> memoryview:
    return memoryview(b"abcd" * 8)


@pytest.mark.parametrize(
    ("build", "kind", "write"),
    [
        (_bytes, "bytes", "TypeError: 'bytes' object does not support item assignment"),
        (_bytearray, "bytearray", "ok"),  # each reader's own copy: nobody else sees it
        (_memoryview, "memoryview", "TypeError: cannot modify read-only memory"),
        (_small_memoryview, "memoryview", "TypeError: cannot modify read-only memory"),
    ],
)
def test_bytes_likes_round_trip_and_cannot_be_changed_for_another_reader(
    build: Any, kind: str, write: str, chdir_tmp: Path
) -> None:
    original = build()
    result = sv.run(value_workflow(build))
    assert result.ok, result.error
    got = result.artifacts["v"]
    assert type(got).__name__ == kind
    if isinstance(original, memoryview):
        assert (got.format, got.shape, got.readonly) == (original.format, original.shape, True)
        assert got.tobytes() == original.tobytes()
    else:
        assert got == original
    for reader in ("r0", "r1"):  # r1 reads it after r0 (maybe) wrote its copy
        facts = result.artifacts[f"facts_{reader}"]
        assert facts["type"] == kind
        assert facts["write"] == write
        digest = pickle.loads(facts["digest"])
        assert digest == (original.tobytes() if isinstance(original, memoryview) else original)


@pytest.mark.parametrize("rows", [32, 32 * 256])  # 16 KiB in band, 4 MiB in a segment
def test_memoryviews_keep_format_and_shape_in_band_and_through_a_segment(rows: int) -> None:
    view = memoryview(bytearray(range(256)) * (2 * rows)).cast("H", (rows, 256))
    pickled, raws = _shm.dumps_sharing(view, dump)
    if raws:
        fd, size, (spans,) = _shm.write_segment([raws])
        try:
            back = _shm.load(pickled, _shm.map_segment(fd, size), spans)
        finally:
            os.close(fd)
    else:
        back = pickle.loads(pickled)
    assert bool(raws) is (view.nbytes >= _shm.SHARE_MIN)
    assert (back.format, back.shape, back.readonly) == ("H", (rows, 256), True)
    assert back.tolist() == view.tolist()
    with pytest.raises(TypeError, match="cannot modify read-only memory"):
        back[0, 0] = 1
    del back
    gc.collect()


def test_a_sealed_segment_cannot_be_mapped_writable_or_written_by_anyone() -> None:
    import mmap  # noqa: PLC0415

    fd, size, _ = _shm.write_segment([[memoryview(b"x" * 4096)]])
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"y", 0)
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


# -- lifetime ----------------------------------------------------------------------------------


@needs_numpy
def test_a_warm_engine_frees_a_runs_segments_when_it_ends(chdir_tmp: Path) -> None:
    with sv.Engine(max_parallel=2) as engine:
        result = engine.run(data_workflow(BIG // 8))
        assert result.ok, result.error
        assert result.artifacts["mapped_r0"] >= BIG
        # The children are still up (warm), and hold nothing of the run any more.
        assert session_processes()
        assert children_segments() == set()
        assert _shm.held_fds() == 0
        # The parent's value keeps only its mapping (which, before Python 3.13,
        # keeps a descriptor of its own).
        assert len(segment_fds()) <= (len(segment_maps()) if sys.version_info < (3, 13) else 0)
        inodes = set(segment_maps())
        assert inodes
        del result
        gc.collect()
        assert segment_maps() == {}


@needs_numpy
@pytest.mark.realtime
def test_closing_the_engine_frees_the_segments_of_a_run_still_going(chdir_tmp: Path) -> None:
    ready = chdir_tmp / "ready"
    wf = data_workflow(BIG // 8, readers=1, reader=wait_for_file, ready=str(ready))
    # Processes of the session that were there before (loky's resource trackers, when
    # the joblib suite ran first) are not this engine's children.
    before = session_processes()
    engine = sv.Engine(max_parallel=2)
    handle = engine.start(wf)
    wait_for(ready.exists, timeout=30, what="the reader to map the array")
    assert _shm.held_fds() >= 1
    assert children_segments()
    engine.close(timeout=10)
    result = handle.wait(10)
    assert result.status is sv.RunStatus.CANCELLED
    assert _shm.held_fds() == 0
    wait_for(lambda: not session_processes() - before, timeout=10, what="children to go")


def wait_for_file(ctx: sv.StepContext) -> None:
    """Map the input, say so, then wait until stopped."""
    assert _mapped() >= ctx.inputs["a"].nbytes
    Path(ctx.params["ready"]).touch()
    signal.pause()


@needs_numpy
def test_a_child_that_crashes_holding_a_segment_leaves_nothing(chdir_tmp: Path) -> None:
    with sv.Engine(max_parallel=2) as engine:
        result = engine.run(data_workflow(BIG // 8, readers=1, reader=crash_holding))
        assert result.status is sv.RunStatus.FAILED
        assert result.steps["r0"].attempts[-1].outcome == "crashed"
        assert "exited with code 9" in (result.steps["r0"].attempts[-1].error_message or "")
        assert children_segments() == set()  # the replacement child holds nothing
        assert _shm.held_fds() == 0
        assert engine.run(data_workflow(BIG // 8, readers=1)).ok  # and the engine works on


@needs_numpy
def test_a_resumed_run_shares_the_stored_array_again(chdir_tmp: Path) -> None:
    flag = chdir_tmp / "fail"
    flag.touch()
    store = str(chdir_tmp / "runs.db")
    n = BIG // 8
    wf = data_workflow(n, readers=1, reader=fail_once, flag=str(flag))
    with sv.SQLiteStore(store, codec="pickle") as db:  # the pickle codec holds arrays
        first = sv.run(wf, store=db, run_id="r")
    assert first.status is sv.RunStatus.FAILED
    del first
    flag.unlink()
    with sv.SQLiteStore(store, create=False, codec="pickle") as db:
        again = sv.resume("r", wf, store=db)
    assert again.ok, again.error
    # "make" did not run again: its array came from the store, into a new segment.
    assert len(again.steps["make"].attempts) == 1
    assert again.artifacts["mapped_r0"] >= n * 8
    assert again.artifacts["sum_r0"] == float(np.arange(n, dtype=np.float64).sum())
    assert _shm.held_fds() == 0


DRIVER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import stepvisor as sv
    from tests.backends.test_shm import data_workflow, wait_for_file
    wf = data_workflow(int(sys.argv[3]), readers=1, reader=wait_for_file, ready=sys.argv[2])
    sv.run(wf)
    """
)


@needs_numpy
@pytest.mark.realtime
def test_a_sigkilled_parent_leaves_no_segment_anywhere(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    before = session_processes()  # not the driver's: e.g. loky's trackers, if started
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(REPO_ROOT), str(ready), str(BIG // 8)],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for(ready.exists, timeout=60, what="the reader to map the array")
        others = session_processes() - before - {driver.pid}
        held = segment_inodes([driver.pid, *others])
        assert held, "the segment should be held by the driver and its reader"
        assert set(segment_fds(driver.pid).values()) <= held  # the parent's descriptor
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
    wait_for(lambda: all(pid_gone(p) for p in others), timeout=10, what="the children to die")
    # Nobody on the machine holds the segment: the kernel has freed it.
    everyone: list[int | str] = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    assert segment_inodes(everyone) & held == set()
    assert dev_shm_entries() == set()


def test_nothing_imports_numpy_and_the_child_boots_without_the_shared_memory_modules() -> None:
    code = textwrap.dedent(
        """
        import sys
        import stepvisor.backends._child
        light = {"numpy", "mmap", "socket", "fcntl"} & set(sys.modules)
        assert not light - {"fcntl"}, f"the child boot imported {light}"
        import stepvisor as sv
        def big(ctx):
            return {"b": b"x" * (4 << 20)}
        def size(ctx):
            return {"n": len(ctx.inputs["b"])}
        wf = sv.Workflow("w", [sv.Step("a", big, executor="process"),
                               sv.Step("z", size, needs=["a"], executor="process")])
        result = sv.run(wf)
        assert result.ok and result.artifacts["n"] == 4 << 20, result
        assert "numpy" not in sys.modules, "a run of bytes imported numpy"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=REPO_ROOT)
