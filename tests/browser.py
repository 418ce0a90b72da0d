"""Headless Chromium for the tests that look at a page as a reader's browser draws it.

The report's tests and the docs site's first-page test take screenshots, and the
graph's test reads the DOM after layout; they share these flags and the short
scratch folder Chromium needs (its singleton socket path must stay under 108
bytes, so not under pytest's ``tmp_path``).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import pytest

CHROMIUM: Final = shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
)

_FLAGS: Final = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def need_chromium() -> str:
    """Chromium's path; skips the test, saying how to install it, where there is none."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return CHROMIUM


def chromium(
    args: list[str],
    tmp_path: Path,
    *,
    size: tuple[int, int] = (1200, 800),
    env: Mapping[str, str],
    timeout: float = 60,
) -> str:
    """Run headless Chromium with ``args``; it must exit 0.  Returns its stdout."""
    scratch = tempfile.mkdtemp(prefix="svc-", dir="/tmp")
    try:
        done = subprocess.run(
            [
                need_chromium(),
                *_FLAGS,
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--window-size={size[0]},{size[1]}",
                *args,
            ],
            env={**env, "TMPDIR": scratch},
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode(errors="replace")


def screenshot(
    page: Path,
    shot: Path,
    tmp_path: Path,
    *,
    size: tuple[int, int] = (1200, 800),
    env: Mapping[str, str],
) -> bytes:
    """A PNG of ``page`` at ``size``, written to ``shot``; checked to be a PNG that size."""
    chromium([f"--screenshot={shot}", page.as_uri()], tmp_path, size=size, env=env)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == size
    return data
