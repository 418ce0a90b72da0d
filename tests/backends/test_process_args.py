"""A process attempt's arguments: plain ``pickle`` for plain values, else ``cloudpickle``."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from stepvisor.backends import _shm
from stepvisor.backends.process import _pickling
from stepvisor.backends.process._pickling import args_blob
from stepvisor.core.attempt import AttemptSpec


def _step(ctx: object) -> None:
    """The step of these attempts (never run here)."""


def _spec(params: dict[str, Any]) -> AttemptSpec:
    return AttemptSpec("run", "s", 1, 1, _step, False, {}, params, None)


@pytest.mark.parametrize(
    "params",
    [
        {"args": (1, 2.5, "x", None, True, 3j), "kwargs": {}},
        {"args": [], "kwargs": {"k": "v", 1: 2}},
        {"n": 7},
    ],
)
def test_plain_values_go_by_plain_pickle_and_come_back_equal(
    params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_: object) -> bytes:
        raise AssertionError("cloudpickle was asked for plain values")

    monkeypatch.setattr(_pickling, "_cloud_dumps", refuse)
    blob = args_blob(_spec(params)).blob
    assert pickle.loads(blob) == ({}, params)


class _Local:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Local)

    __hash__ = object.__hash__


@pytest.mark.parametrize(
    "params",
    [
        {"args": (_Local(),), "kwargs": {}},  # an object: cloudpickle decides how it travels
        {"args": ((1, 2),), "kwargs": {}},  # nested: looked at no deeper, so cloudpickle
        {"args": ({1, 2},), "kwargs": {}},
        {"data": b"x" * 10},  # bytes: a large one goes by shared memory
        {"f": lambda x: x},
    ],
)
def test_other_values_still_go_by_cloudpickle(
    params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[object] = []
    real = _pickling._cloud_dumps

    def spy(value: object, buffers: list[pickle.PickleBuffer] | None) -> bytes:
        used.append(value)
        return real(value, buffers)

    monkeypatch.setattr(_pickling, "_cloud_dumps", spy)
    args_blob(_spec(params))
    assert used


def test_large_bytes_still_go_by_shared_memory() -> None:
    spec = _spec({"data": b"x" * _shm.SHARE_MIN})
    args = args_blob(spec)
    try:
        assert args.fds  # a segment, not the pipe
    finally:
        args.close()
