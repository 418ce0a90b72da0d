"""A joblib backend: ``Parallel`` calls, and scikit-learn's ``n_jobs``, run on stepvisor.

::

    import joblib
    import stepvisor.joblib

    stepvisor.joblib.register()
    with joblib.parallel_config(backend="stepvisor", n_jobs=4):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in xs)

Each batch of a ``Parallel`` call is a call of a :class:`stepvisor.Executor`
on a warm engine kept across ``Parallel`` calls (``n_jobs`` is its bound), so
it gets what a step gets: a ``timeout`` that stops that call alone (its
process group is killed; the engine goes on), retries, a crash that fails that
call with :class:`~stepvisor.WorkerCrashedError` while a fresh worker takes its
place, and large NumPy arguments through shared memory.  Backend parameters::

    joblib.parallel_config(backend="stepvisor", executor="process",  # or "thread"
                           timeout=30, retry=sv.RetryPolicy(max_attempts=3))

Importing this module imports neither joblib nor the engine: :func:`register`
does, and the child processes import only :mod:`stepvisor.joblib._child`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from stepvisor.joblib._backend import StepvisorBackend as StepvisorBackend

__all__ = ["BACKEND_NAME", "StepvisorBackend", "close", "register"]

#: The name ``parallel_config(backend=...)`` and ``Parallel(backend=...)`` take.
BACKEND_NAME: Final = "stepvisor"


def register(*, make_default: bool = False) -> None:
    """Make ``"stepvisor"`` a joblib backend (``make_default=True``: the default one).

    Raises ``ImportError`` naming the extra to install when joblib is missing.
    """
    try:
        import joblib  # noqa: PLC0415 - only here: importing stepvisor must not import joblib
    except ImportError as exc:
        raise ImportError(
            "stepvisor.joblib.register() needs joblib; install it with "
            "pip install 'stepvisor[joblib]'"
        ) from exc
    from stepvisor.joblib._backend import StepvisorBackend  # noqa: PLC0415

    joblib.register_parallel_backend(BACKEND_NAME, StepvisorBackend, make_default=make_default)


def close() -> None:
    """Stop the warm engines ``Parallel`` calls left running (their workers and children).

    Called at interpreter exit too.  The next ``Parallel`` call starts a new one.
    """
    from stepvisor.joblib._engines import ENGINES  # noqa: PLC0415

    ENGINES.close_all()


def __getattr__(name: str) -> Any:
    if name == "StepvisorBackend":
        from stepvisor.joblib._backend import StepvisorBackend  # noqa: PLC0415

        return StepvisorBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
