"""What a node is: a function or a ``BaseNode`` class, and what it receives and returns.

A registry maps ``uses`` keys to implementations:

* ``async def f(ctx: NodeContext) -> NodeResult | Any``, or a plain ``def``
  (run in a worker thread so it never blocks the event loop; it reaches the
  context through ``ctx.context.sync``);
* a subclass of :class:`BaseNode`, constructed per execution as
  ``Cls(params, node_id)``; ``prep`` → ``exec`` (the only retried phase) →
  ``post``, with an optional ``fallback``.

Any return value ``v`` that is not a :class:`NodeResult` means ``NodeResult(output=v)``.

``ctx.engine`` is the :class:`EngineServices` of whatever runs the node: the
in-memory runtime and a distributed worker each supply their own (a short
sleep waits in place on both; a long one parks the run in memory and delays
the successors' jobs on a worker). Built-in nodes reach sleeps and subflows
only through it, so one implementation of each works on every backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ..errors import FlowcraftError

if TYPE_CHECKING:
    from ..blueprint import NodeDefinition
    from ..context import TrackedContext


class AwaitingSignal(Exception):
    """Raised by ``wait`` (and long ``sleep``) nodes: park the run until it is resumed."""

    def __init__(self, details: Mapping[str, Any]) -> None:
        super().__init__(details.get("reason", "awaiting"))
        self.details = dict(details)


FOLLOWS = "follows"
"""The key of a dynamic node's definition naming the nodes, listed before it in the same
``dynamic_nodes``, that it runs after (see :class:`NodeResult`)."""


@dataclass(slots=True)
class NodeResult:
    """What a node produced: its ``output``, an optional routing ``action``, and
    ``dynamic_nodes`` to add to this run's graph (used by ``batch-scatter``).

    Dynamic nodes run after the node that added them and before its successors. One whose
    definition has ``follows`` (a list of ids of nodes listed before it) runs after those
    instead, and they lead to it rather than to the successors: a chain of waves."""

    output: Any = None
    action: str | None = None
    dynamic_nodes: Sequence[NodeDefinition] = ()


class CancellationSignal:
    """Set when a node's attempt is cancelled (its timeout expired, its run was cancelled,
    or the worker stops).

    A signal made with a ``parent`` is set when the parent is (a run's signal reaches
    every attempt of its nodes); setting it never sets the parent, so one attempt's
    timeout cancels only that attempt. Async nodes are cancelled by the event loop
    anyway; a plain ``def`` node running in a thread should poll ``is_set()`` in long
    loops.
    """

    __slots__ = ("__weakref__", "_callbacks", "_children", "_is_set", "_lock", "_parent")

    def __init__(self, parent: CancellationSignal | None = None) -> None:
        # A flag under a lock, not a threading.Event: one signal is made per node attempt,
        # and nobody blocks on it (waiters register callbacks).
        self._is_set = False
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        # Weak (and made on first use), so the attempts of a long run do not pile up in
        # the run's signal.
        self._children: weakref.WeakSet[CancellationSignal] | None = None
        # Until something waits on this signal (a callback, a child that has one), it only
        # asks its parent in is_set(); then the parent sets it. Most attempts never wait.
        self._parent = parent

    def _attach(self) -> None:
        """Have the parent set this signal when it is set (from now on)."""
        parent = self._parent
        if parent is not None:
            self._parent = None
            parent._adopt(self)

    def _adopt(self, child: CancellationSignal) -> None:
        self._attach()
        with self._lock:
            if not self._is_set:
                if self._children is None:
                    self._children = weakref.WeakSet()
                self._children.add(child)
                return
        child.set()

    def is_set(self) -> bool:
        if self._is_set:
            return True
        parent = self._parent
        return parent is not None and parent.is_set()

    def set(self) -> None:
        with self._lock:
            if self._is_set:
                return
            self._is_set = True
            children = list(self._children) if self._children is not None else []
            callbacks = list(self._callbacks)
            self._children = None
        for child in children:
            child.set()
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the thread that sets the signal) once it is set; at once
        if it already is."""
        self._attach()
        with self._lock:
            if not self._is_set:
                self._callbacks.append(callback)
                return
        callback()

    def remove_callback(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    async def wait(self) -> None:
        """Return once the signal is set."""
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(woken.set)

        self.add_callback(wake)
        try:
            await woken.wait()
        finally:
            self.remove_callback(wake)


class EngineServices(Protocol):
    """What the engine running a node offers to built-in nodes (``ctx.engine``)."""

    async def sleep(self, ctx: NodeContext, seconds: float) -> None:
        """Pause the node ``ctx`` for ``seconds`` (or make its successors wait that long)."""
        ...

    async def run_subflow(self, ctx: NodeContext, blueprint_id: str) -> Any:
        """Run blueprint ``blueprint_id`` as the node ``ctx``; return the node's output."""
        ...


class NoEngineServices:
    """``ctx.engine`` of a context made outside an engine (a node's unit test): the services
    are refused with an error that says so."""

    async def sleep(self, ctx: NodeContext, seconds: float) -> None:
        raise self._refused(ctx, "sleep")

    async def run_subflow(self, ctx: NodeContext, blueprint_id: str) -> Any:
        raise self._refused(ctx, "subflow")

    @staticmethod
    def _refused(ctx: NodeContext, what: str) -> FlowcraftError:
        return FlowcraftError(
            f"node '{ctx.node_id}' needs the engine for a {what}, but its context was made "
            "without one: run it through a runtime or a worker, or pass engine=",
            node_id=ctx.node_id)


NO_ENGINE: EngineServices = NoEngineServices()


@dataclass(slots=True)
class NodeContext:
    """Everything a node execution can see."""

    context: TrackedContext
    """The run's context: ``await ctx.context.get(key)``, or ``ctx.context.sync.get(key)``
    in a plain ``def`` node."""
    input: Any
    params: Mapping[str, Any]
    dependencies: Mapping[str, Any]
    run_id: str
    node_id: str
    blueprint_id: str
    attempt: int = 1
    """1 for the first attempt, 2 for the first retry, ..."""
    iteration: int = 0
    """How many times this node already completed in this run (loops)."""
    signal: CancellationSignal = field(default_factory=CancellationSignal)
    engine: EngineServices = field(default=NO_ENGINE, repr=False)
    """The engine services built-in nodes use (sleeps, subflows); not part of the user API."""

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and redeliveries of the same node execution.

        Pass it to external systems (payment APIs, ``ClientRequestToken`` of
        AWS calls, an ``INSERT ... ON CONFLICT DO NOTHING``) so that a node run
        again after a crash does not repeat its side effect.
        """
        return f"{self.run_id}:{self.node_id}:{self.iteration}"

    @property
    def cancelled(self) -> bool:
        return self.signal.is_set()


class BaseNode:
    """A node with separate phases; subclass and override what you need.

    ``prep`` reads what the node needs, ``exec`` does the work (and is the only
    phase retried), ``post`` turns the result into a :class:`NodeResult` or an
    output. ``fallback`` runs after the last failed attempt of ``exec``.
    """

    def __init__(self, params: Mapping[str, Any] | None = None, node_id: str = "") -> None:
        self.params: Mapping[str, Any] = params or {}
        self.node_id = node_id

    async def prep(self, ctx: NodeContext) -> Any:
        return ctx.input

    async def exec(self, prep_result: Any, ctx: NodeContext) -> Any:
        return prep_result

    async def post(self, exec_result: Any, ctx: NodeContext) -> Any:
        return exec_result

    async def fallback(self, error: BaseException, ctx: NodeContext) -> Any:
        raise error

    @classmethod
    def has_fallback(cls) -> bool:
        return cls.fallback is not BaseNode.fallback


NodeFunction: TypeAlias = Callable[[NodeContext], "Awaitable[Any] | Any"]
NodeImplementation: TypeAlias = "NodeFunction | type[BaseNode]"
Registry: TypeAlias = Mapping[str, Any]


def is_node_class(implementation: Any) -> bool:
    return isinstance(implementation, type) and issubclass(implementation, BaseNode)


def as_result(value: Any) -> NodeResult:
    return value if isinstance(value, NodeResult) else NodeResult(output=value)
