"""How an Executor call runs as a step: a step function that calls ``fn(*args, **kwargs)``.

A step takes its context and returns a mapping of artifacts; a call takes
arguments and returns anything.  :class:`Invoke` is the step function of a
call: it reads the call's arguments from ``ctx.params`` and returns the value
as the artifact ``RESULT``.  It lives in a module of its own that imports
nothing, because a process call sends it (with ``fn``) to a worker child,
which imports this module to load it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from stepvisor.context import StepContext

__all__ = ["ARGS", "CURRENT", "KWARGS", "RESULT", "AsyncInvoke", "Invoke"]

#: The ``ctx.params`` keys of a call's arguments, and the artifact of its value.
ARGS: Final = "args"
KWARGS: Final = "kwargs"
RESULT: Final = "result"

#: The context of the call running here (``Executor.context()`` reads it): a
#: plain function has no ``ctx`` argument, yet a call may want to see a stop.
CURRENT: ContextVar[StepContext] = ContextVar("stepvisor_call_context")


def _forgotten(*_: object, **__: object) -> None:
    raise RuntimeError("this call has ended; its function was let go")


class Invoke:
    """The step function of a call of a plain function ``fn``."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.fn,))

    def forget(self) -> None:
        """Let go of ``fn`` once the call has ended.

        The Worker that ran the call may keep its last message (with this
        object) until its next one; the call's function must not live on in it.
        """
        self.fn = _forgotten

    def __call__(self, ctx: StepContext) -> dict[str, Any]:
        params = ctx.params
        token = CURRENT.set(ctx)
        try:
            return {RESULT: self.fn(*params[ARGS], **params[KWARGS])}
        finally:
            CURRENT.reset(token)


class AsyncInvoke(Invoke):
    """The step function of a call of an ``async def`` function ``fn``."""

    __slots__ = ()

    async def __call__(self, ctx: StepContext) -> dict[str, Any]:  # type: ignore[override]
        params = ctx.params
        token = CURRENT.set(ctx)
        try:
            return {RESULT: await self.fn(*params[ARGS], **params[KWARGS])}
        finally:
            CURRENT.reset(token)
