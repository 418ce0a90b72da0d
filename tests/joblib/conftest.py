"""The joblib backend's tests compare with loky: its session trackers must be up first."""

from __future__ import annotations

import pytest

from tests import joblib_loky


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before each test's leak check looks: loky's and multiprocessing's trackers are running.

    They live for the session, but one that died since (its pipe closed by a test's
    children) would be started again inside the next test that needs it, and count as
    left behind (seen once in a full run: multiprocessing's resource tracker).
    """
    del item
    joblib_loky.prepare()
