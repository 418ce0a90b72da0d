"""Importing Ray, reaching a cluster, and sharing one Ray session between runs.

Ray is imported only when a Ray step runs, and started only then; a Ray
instance stepvisor started is shut down when the last run using it ends, and
one the program started itself (``ray.is_initialized()``) is reused and left
running.  Also here: the task options a step's resources map onto.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import threading
from collections.abc import Mapping
from typing import Any, Final

from stepvisor._log import log as _root_log
from stepvisor.errors import BackendUnavailableError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "MIN_RAY",
    "Session",
    "check_reachable",
    "import_ray",
    "task_options",
]

log = _root_log.getChild("backends.ray")

#: How long ``connect`` waits for a cluster address to accept a connection.
CONNECT_TIMEOUT_S: Final = 5.0
#: The oldest Ray this backend is tested against.
MIN_RAY: Final = (2, 9)
_PIP_HINT: Final = "pip install 'stepvisor[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a :class:`BackendUnavailableError` saying how to get it."""
    try:
        ray = importlib.import_module("ray")
    except ImportError as exc:
        raise BackendUnavailableError(
            f"a step uses executor='ray', but Ray cannot be imported here ({exc}); "
            f"install it with {_PIP_HINT}, or run the step with executor='process'"
        ) from exc
    version = _version_tuple(getattr(ray, "__version__", ""))
    if version is not None and version < MIN_RAY:
        wanted = ".".join(map(str, MIN_RAY))
        raise BackendUnavailableError(
            f"stepvisor needs Ray >= {wanted}, but Ray {ray.__version__} is installed; "
            f"upgrade it with {_PIP_HINT}"
        )
    return ray


def _version_tuple(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def _host_port(address: str) -> tuple[str, int] | None:
    """Where ``address`` (``host:port`` or ``ray://host:port``) listens; ``None`` if unknown."""
    rest = address.strip()
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        if scheme != "ray":
            return None
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def check_reachable(address: str, *, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`BackendUnavailableError` unless ``address`` accepts a TCP connection.

    Done before ``ray.init``, which can wait a long time for a cluster that
    is not there.  Addresses without a host and port (``auto``) are left to Ray.
    """
    where = _host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout):
            pass
    except OSError as exc:
        raise BackendUnavailableError(
            f"cannot reach the Ray cluster at {address!r} ({type(exc).__name__}: {exc}; "
            f"waited up to {timeout:g} s): check that it is running (`ray status "
            f"--address {address}`) and reachable from here, fix ray_address / "
            "STEPVISOR_RAY_ADDRESS, or leave both unset to run on a local Ray instance"
        ) from exc


class Session:
    """This process's use of Ray: who called ``ray.init``, and how many backends use it.

    Two runs may use Ray at once; the Ray instance stepvisor started must stay
    up until the last of them closes, and one the program started must never be
    shut down by stepvisor.
    """

    lock = threading.Lock()
    users = 0
    owned = False

    @classmethod
    def acquire(cls, ray: Any, *, address: str | None, timeout: float) -> None:
        with cls.lock:
            if ray.is_initialized():
                if cls.users == 0:
                    cls.owned = False
                if address is not None and not cls.owned:
                    log.info("Ray is already initialized here; ray_address %r is not used", address)
            else:
                _init(ray, address=address, timeout=timeout)
                cls.owned = True
            cls.users += 1

    @classmethod
    def release(cls, ray: Any) -> None:
        with cls.lock:
            cls.users = max(0, cls.users - 1)
            if cls.users or not cls.owned:
                return
            cls.owned = False
            if ray.is_initialized():
                ray.shutdown()


def _init(ray: Any, *, address: str | None, timeout: float) -> None:
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        what = "could not start a local Ray instance"
        kwargs: dict[str, Any] = {"include_dashboard": False}
    else:
        check_reachable(address, timeout=timeout)
        what = f"could not connect to the Ray cluster at {address!r}"
        kwargs = {"address": address}
    try:
        ray.init(logging_level=logging.WARNING, **kwargs)
    except Exception as exc:
        if ray.is_initialized():
            with contextlib.suppress(Exception):
                ray.shutdown()
        raise BackendUnavailableError(
            f"{what} ({type(exc).__name__}: {exc}); check it with `ray status`, or set "
            "ray_address / STEPVISOR_RAY_ADDRESS to a running cluster"
        ) from exc


# -- task options ------------------------------------------------------------------------


def task_options(resources: Mapping[str, float] | None) -> dict[str, Any]:
    """Ray task options for one attempt of a step asking for ``resources``.

    ``CPU``, ``GPU`` and ``memory`` (bytes) map onto ``num_cpus``, ``num_gpus``
    and ``memory``; every other key is a custom resource (a zero amount asks for
    nothing).  Without ``CPU`` a step asks for one CPU.  Ray's own retries are
    always off: the engine retries.
    """
    options: dict[str, Any] = {"num_cpus": 1, "max_retries": 0, "retry_exceptions": False}
    custom: dict[str, float] = {}
    for key, amount in (resources or {}).items():
        if key == "CPU":
            options["num_cpus"] = amount
        elif key == "GPU":
            options["num_gpus"] = amount
        elif key == "memory":
            options["memory"] = amount
        elif amount:
            custom[key] = amount
    if custom:
        options["resources"] = custom
    return options
