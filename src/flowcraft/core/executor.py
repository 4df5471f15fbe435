"""Running one node: attempts, per-attempt timeout with cancellation, retry delay, fallback.

Shared by the in-memory runtime and distributed workers. The executor knows
nothing about routing or storage: it turns (node definition, implementation,
context) into a :class:`NodeOutcome`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..blueprint import NodeDefinition
from ..errors import FlowcraftError, NodeTimeoutError, NonRetryableError
from ..events import EventBus, FlowcraftEvent, safe_emit
from ..nodes.base import AwaitingSignal, BaseNode, NodeContext, NodeResult, as_result, is_node_class

logger = logging.getLogger("flowcraft.runtime")


@dataclass(frozen=True, slots=True)
class NodeError:
    """Why a node failed: which node, which attempt, and the error."""

    node_id: str
    message: str
    attempt: int
    error_type: str
    run_id: str | None = None
    traceback: str | None = None
    """The end of the formatted traceback (the whole error fits in 4 KB when stored)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "message": self.message,
            "attempt": self.attempt,
            "errorType": self.error_type,
            **({"runId": self.run_id} if self.run_id else {}),
            **({"traceback": self.traceback} if self.traceback else {}),
        }

    @classmethod
    def from_exception(cls, node_id: str, error: BaseException, *, attempt: int = 1,
                       run_id: str | None = None) -> NodeError:
        """A node failure for an error the engine met around the node (a condition or
        transform that cannot be evaluated, an output that cannot be stored), not one the
        node raised: such failures are final, never retried and never handed to a fallback."""
        return cls(node_id, _describe(error), attempt, type(error).__name__, run_id or None,
                   _traceback(error))


def _traceback(error: BaseException) -> str | None:
    """The traceback to keep with a failure, cut to fit the stored error's 4 KB budget."""
    from ..observability.failures import format_error

    return format_error(error)["traceback"] or None


@dataclass(slots=True)
class NodeOutcome:
    result: NodeResult | None = None
    error: NodeError | None = None
    awaiting: dict[str, Any] | None = None
    attempts: int = 0
    used_fallback: bool = False


async def call_implementation(implementation: Any, node: NodeDefinition, ctx: NodeContext,
                              params: Mapping[str, Any] | None = None) -> Any:
    """One full call of a node implementation (function, or prep/exec/post of a class)."""
    if is_node_class(implementation):
        instance: BaseNode = implementation(dict(params if params is not None else ctx.params),
                                            node.id)
        prepared = await instance.prep(ctx)
        executed = await instance.exec(prepared, ctx)
        return await instance.post(executed, ctx)
    if params is not None:  # a fallback named by node id runs with that node's params
        ctx = dataclasses.replace(ctx, params=params)
    outcome = _call_function(implementation, ctx)
    return await outcome if inspect.isawaitable(outcome) else outcome


_IS_ASYNC: dict[Any, bool] = {}


def _is_async(function: Callable[..., Any]) -> bool:
    """Cached: ``inspect`` is slow enough to show at 100k nodes per run."""
    try:
        return _IS_ASYNC[function]
    except (KeyError, TypeError):
        verdict = inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(
            getattr(function, "__call__", None)  # noqa: B004 - async callable objects
        )
        try:
            if len(_IS_ASYNC) > 10_000:
                _IS_ASYNC.clear()
            _IS_ASYNC[function] = verdict
        except TypeError:  # unhashable callable
            pass
        return verdict


def _call_function(function: Callable[..., Any], ctx: NodeContext) -> Any:
    if _is_async(function):
        return function(ctx)
    # Plain functions run in a thread so a blocking call never stalls other nodes.
    return asyncio.to_thread(function, ctx)


def retry_delay_seconds(node: NodeDefinition, failed_attempt: int) -> float:
    config = node.config
    if config is None or not config.retry_delay:
        return 0.0
    delay = config.retry_delay / 1000.0
    if config.retry_backoff == "exponential":
        delay = delay * (2 ** (failed_attempt - 1)) * (1.0 + random.random() * 0.2)
    if config.retry_max_delay is not None:
        delay = min(delay, config.retry_max_delay / 1000.0)
    return delay


def is_retryable(node: NodeDefinition, error: BaseException) -> bool:
    """Whether another attempt may fix ``error``: never for :class:`NonRetryableError`;
    with ``retryOn``, only for the listed types (by name, or module-qualified name) and
    their subclasses."""
    if isinstance(error, NonRetryableError):
        return False
    retry_on = node.config.retry_on if node.config else None
    if retry_on is None:
        return True
    return any(
        kind.__name__ in retry_on or f"{kind.__module__}.{kind.__qualname__}" in retry_on
        for kind in type(error).__mro__
    )


async def execute_node(
    node: NodeDefinition,
    implementation: Any,
    make_context: Callable[[int], NodeContext],
    *,
    fallback: Any = None,
    fallback_params: Mapping[str, Any] | None = None,
    event_bus: EventBus | None = None,
    run_id: str = "",
) -> NodeOutcome:
    """Run ``node`` with its retry/timeout/fallback settings and report what happened."""
    config = node.config
    if (fallback is None and (config is None or (not config.timeout
                                                  and (config.max_retries or 1) <= 1))
            and _is_async(implementation) and not is_node_class(implementation)):
        # The common node: one attempt of an async function, no timeout, no fallback (a
        # fallback the implementation's own class offers needs a node class).
        ctx = make_context(1)
        try:
            return NodeOutcome(result=as_result(await implementation(ctx)), attempts=1)
        except AwaitingSignal as signal:
            return NodeOutcome(awaiting=signal.details, attempts=1)
        except Exception as exc:
            return NodeOutcome(error=_failure(node, exc, 1, run_id), attempts=1)
    attempts = max(1, (config.max_retries if config and config.max_retries else 1))
    timeout = config.timeout / 1000.0 if config and config.timeout else None
    node_class = is_node_class(implementation)
    ctx = make_context(1)
    last_error: BaseException | None = None
    attempt = 0
    instance: BaseNode | None = None
    prepared: Any = None
    post_failed = False
    try:
        if node_class:
            instance = implementation(dict(ctx.params), node.id)
            prepared = await _with_timeout(instance.prep(ctx), timeout, ctx, node)
    except AwaitingSignal as signal:
        return NodeOutcome(awaiting=signal.details, attempts=1)
    except Exception as exc:  # prep is not retried
        last_error = exc
        attempt = 1
    if last_error is None:
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                ctx = make_context(attempt)
            try:
                if instance is not None:
                    executed = await _with_timeout(instance.exec(prepared, ctx), timeout, ctx, node)
                else:
                    value = await _with_timeout(
                        _awaitable(implementation, ctx), timeout, ctx, node
                    )
                    return NodeOutcome(result=as_result(value), attempts=attempt)
            except AwaitingSignal as signal:
                return NodeOutcome(awaiting=signal.details, attempts=attempt)
            except Exception as exc:
                last_error = exc
                if attempt < attempts and not is_retryable(node, exc):
                    logger.warning("run %s node %s: attempt %d/%d failed (%s); not retried",
                                   run_id, node.id, attempt, attempts, _describe(exc))
                    break
                if attempt < attempts:
                    delay = retry_delay_seconds(node, attempt)
                    logger.warning(
                        "run %s node %s: attempt %d/%d failed (%s); retrying in %.3fs",
                        run_id, node.id, attempt, attempts, _describe(exc), delay,
                    )
                    await safe_emit(event_bus, FlowcraftEvent("node:retry", {
                        "runId": run_id, "nodeId": node.id, "attempt": attempt,
                        "error": _describe(exc),
                    }))
                    if delay:
                        await asyncio.sleep(delay)
                continue
            # exec() succeeded: post() runs once, outside the retry loop (only exec is retried,
            # so a failing post() never repeats exec()'s side effects).
            try:
                assert instance is not None
                value = await instance.post(executed, ctx)
                return NodeOutcome(result=as_result(value), attempts=attempt)
            except AwaitingSignal as signal:
                return NodeOutcome(awaiting=signal.details, attempts=attempt)
            except Exception as exc:
                last_error = exc
                post_failed = True
                break
    assert last_error is not None
    if ctx.signal.is_set():  # the last attempt timed out; the fallback is a fresh start
        ctx = make_context(attempt)
    # Fallbacks: the class's own fallback() first, then config.fallback.
    if instance is not None and not post_failed and type(instance).has_fallback():
        try:
            value = await instance.fallback(last_error, ctx)
            value = await instance.post(value, ctx)  # post() shapes a rescued result too
            await _emit_fallback(event_bus, run_id, node.id, "fallback()", last_error)
            return NodeOutcome(result=as_result(value), attempts=attempt, used_fallback=True)
        except Exception as exc:
            last_error = exc
    if fallback is not None:
        await _emit_fallback(event_bus, run_id, node.id, str(node.config and node.config.fallback),
                             last_error)
        logger.warning("run %s node %s: running fallback after %s", run_id, node.id,
                       _describe(last_error))
        try:
            value = await _with_timeout(
                call_implementation(fallback, node, ctx, fallback_params), timeout, ctx, node
            )
            return NodeOutcome(result=as_result(value), attempts=attempt, used_fallback=True)
        except AwaitingSignal as signal:
            return NodeOutcome(awaiting=signal.details, attempts=attempt, used_fallback=True)
        except Exception as exc:
            last_error = exc
    return NodeOutcome(error=_failure(node, last_error, attempt, run_id), attempts=attempt)


def _failure(node: NodeDefinition, error: BaseException, attempt: int, run_id: str) -> NodeError:
    """The error a node's last attempt (and fallback) ended with."""
    return NodeError(node_id=node.id, message=_describe(error), attempt=attempt,
                     error_type=type(error).__name__, run_id=run_id or None,
                     traceback=_traceback(error))


async def _awaitable(implementation: Any, ctx: NodeContext) -> Any:
    outcome = _call_function(implementation, ctx)
    return await outcome if inspect.isawaitable(outcome) else outcome


async def _with_timeout(awaitable: Any, timeout: float | None, ctx: NodeContext,
                        node: NodeDefinition) -> Any:
    if timeout is None:
        return await awaitable
    try:
        async with asyncio.timeout(timeout):
            return await awaitable
    except TimeoutError:
        ctx.signal.set()  # threads and cooperative nodes see the cancellation
        raise NodeTimeoutError(
            f"node '{node.id}' timed out after {timeout * 1000:g} ms (attempt {ctx.attempt})",
            node_id=node.id, run_id=ctx.run_id,
        ) from None


async def _emit_fallback(bus: EventBus | None, run_id: str, node_id: str, fallback: str,
                         error: BaseException) -> None:
    await safe_emit(bus, FlowcraftEvent("node:fallback", {
        "runId": run_id, "nodeId": node_id, "fallback": fallback, "error": _describe(error),
    }))


def _describe(error: BaseException) -> str:
    if isinstance(error, FlowcraftError):
        return error.message
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
