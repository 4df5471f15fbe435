"""Middleware: code that runs around every node execution, in memory and on workers.

A middleware is any object with some of three methods (sync or async):

* ``before_node(ctx, node_id)`` - before the node's first attempt;
* ``around_node(ctx, node_id, next)`` - wraps the node: ``await next()`` runs it (all
  its attempts, timeouts and fallback) and returns its :class:`NodeResult`, or raises
  :class:`NodeExecutionError` when it failed; what ``around_node`` returns (a
  ``NodeResult`` or a plain value) becomes the node's result;
* ``after_node(ctx, node_id, result, error)`` - after the node, with its ``NodeResult``
  or ``None`` and the error (an exception) or ``None``.

``ctx`` is the run's context (``await ctx.get(key)``, ``await ctx.set(key, value)``);
writes land with the node's own writes. Subclass :class:`Middleware` for no-op defaults.

Order: the first middleware in the list is the outermost. ``before_node`` hooks run
first to last, ``around_node`` hooks nest first-outside, ``after_node`` hooks run last
to first.

Errors: a ``before_node`` or ``around_node`` that raises fails the node as a node error
would, once (retries and fallbacks belong to the node, inside ``next``); a node whose
``before_node`` failed does not run. ``after_node`` errors are logged and ignored: the
node has already run. A node that parks (``wait``, ``webhook``, a long ``sleep``) makes
``next()`` raise the engine's awaiting signal: let it propagate.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import NodeExecutionError
from ..nodes.base import AwaitingSignal, NodeResult, as_result
from .executor import NodeError, NodeOutcome, _describe

logger = logging.getLogger("flowcraft.middleware")

Next = Callable[[], Awaitable[NodeResult]]


class Middleware:
    """A base class with no-op hooks; override the ones you need."""

    async def before_node(self, ctx: Any, node_id: str) -> None:
        return None

    async def after_node(self, ctx: Any, node_id: str, result: NodeResult | None,
                         error: BaseException | None) -> None:
        return None

    async def around_node(self, ctx: Any, node_id: str, next: Next) -> Any:
        return await next()


async def _call(hook: Callable[..., Any], *args: Any) -> Any:
    value = hook(*args)
    return await value if inspect.isawaitable(value) else value


def _hook(middleware: Any, name: str) -> Callable[..., Any] | None:
    hook = getattr(middleware, name, None)
    if hook is None:
        return None
    # The base class's no-ops cost an await per node each: skip them.
    if getattr(type(middleware), name, None) is getattr(Middleware, name):
        return None
    return hook if callable(hook) else None


async def run_with_middleware(
    middleware: Sequence[Any], ctx: Any, node_id: str, run_id: str,
    core: Callable[[], Awaitable[NodeOutcome]],
) -> NodeOutcome:
    """Run ``core`` (the node with its retries and fallback) inside ``middleware``."""
    outcome: NodeOutcome | None = None
    error: BaseException | None = None
    result: NodeResult | None = None
    try:
        for item in middleware:
            hook = _hook(item, "before_node")
            if hook is not None:
                await _call(hook, ctx, node_id)

        async def innermost() -> NodeResult:
            nonlocal outcome
            outcome = await core()
            if outcome.awaiting is not None:
                raise AwaitingSignal(outcome.awaiting)
            if outcome.error is not None:
                failed = outcome.error
                raise NodeExecutionError(failed.message, node_id=node_id, run_id=run_id,
                                         attempt=failed.attempt)
            assert outcome.result is not None
            return outcome.result

        chain: Next = innermost
        for item in reversed(middleware):
            hook = _hook(item, "around_node")
            if hook is not None:
                chain = _wrap(hook, ctx, node_id, chain)
        result = as_result(await chain())
    except AwaitingSignal as signal:
        final = NodeOutcome(awaiting=signal.details,
                            attempts=outcome.attempts if outcome else 1)
    except Exception as exc:
        error = exc
        if outcome is not None and outcome.error is not None and isinstance(
                exc, NodeExecutionError) and exc.message == outcome.error.message:
            final = outcome  # the node's own failure, passed through unchanged
        else:
            final = NodeOutcome(error=NodeError(
                node_id, _describe(exc), outcome.attempts if outcome else 0,
                type(exc).__name__, run_id or None), attempts=outcome.attempts if outcome else 0)
    else:
        final = outcome if outcome is not None and outcome.result is result else NodeOutcome(
            result=result, attempts=outcome.attempts if outcome else 0,
            used_fallback=bool(outcome and outcome.used_fallback))
    if final.awaiting is None:
        for item in reversed(middleware):
            hook = _hook(item, "after_node")
            if hook is None:
                continue
            try:
                await _call(hook, ctx, node_id, result, error)
            except Exception:
                logger.exception("run %s node %s: after_node of %s failed (ignored)", run_id,
                                 node_id, type(item).__name__)
    return final


def _wrap(hook: Callable[..., Any], ctx: Any, node_id: str, inner: Next) -> Next:
    async def call() -> NodeResult:
        return as_result(await _call(hook, ctx, node_id, inner))
    return call
