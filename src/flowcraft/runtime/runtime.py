"""``FlowRuntime``: runs blueprints in this process.

A run is a set of asyncio tasks, one per node execution. When a node
finishes, its output, context writes and routing record land in the run's
context dict, and :mod:`flowcraft.runtime.routing` decides which successors
run, which are skipped, and which keep waiting at a join. All decisions are
made synchronously between awaits, so concurrent nodes never race on the
bookkeeping.

The same :class:`NodeEngine` (registry lookup, node contexts, sleep and
subflow services) serves the distributed workers. It also refuses, in one
place for every engine, what no store can hold: ``NodeEngine.graph`` checks
a blueprint's expressions and registry before any node runs, and
``NodeEngine.run_node`` fails a node (once: no retry, no fallback) whose
output or context writes are not plain JSON, dropping those writes. Once
nodes run, ``FlowRuntime.run`` never raises: every failure is in the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from ..analysis import start_node_ids
from ..blueprint import NodeDefinition, WorkflowBlueprint, check_blueprint
from ..context import (
    TrackedContext,
    check_storable,
    public_view,
    squash,
    validate_initial_context,
)
from ..errors import (
    ExpressionError,
    FlowcraftError,
    InvalidContextError,
    InvalidOptionError,
    UnknownBlueprintError,
    UnstorableValueError,
)
from ..events import EventBus, EventStore, FlowcraftEvent, RecordingBus, safe_emit
from ..nodes.base import AwaitingSignal, CancellationSignal, NodeContext, NodeResult
from ..nodes.builtins import BUILTIN_NODES
from .executor import NodeError, NodeOutcome, execute_node
from .graph import Graph
from .routing import (
    AWAITING_DETAILS_KEY,
    AWAITING_IDS_KEY,
    DYNAMIC_PREFIX,
    INPUTS_PREFIX,
    OUTPUTS_PREFIX,
    JoinDecision,
    completed_record,
    join_arrivals,
    join_decision,
    output_key,
    read_record,
    ready_frontier,
    record_key,
    resolution_count,
    resolve_input,
    resolved_for_good,
    route,
    skipped_record,
)

if TYPE_CHECKING:
    from .stepper import Stepper

logger = logging.getLogger("flowcraft.runtime")

RunStatus = Literal["completed", "failed", "awaiting", "cancelled", "stalled"]


@dataclass
class WorkflowResult:
    """How a run ended. ``context`` hides the engine's ``_flowcraft.*`` bookkeeping;
    ``serialized_context`` is the complete state, as ``resume`` needs it."""

    status: RunStatus
    context: dict[str, Any]
    serialized_context: str
    errors: list[NodeError] = field(default_factory=list)
    run_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id,
            "status": self.status,
            "context": self.context,
            "errors": [error.to_dict() for error in self.errors],
        }


@dataclass
class RuntimeOptions:
    """What a runtime carries to a distributed adapter: blueprints, registry, dependencies."""

    blueprints: dict[str, WorkflowBlueprint]
    registry: dict[str, Any]
    dependencies: dict[str, Any]
    event_bus: EventBus | None = None
    max_inline_sleep_seconds: float = 300.0
    max_node_iterations: int = 1000
    middleware: list[Any] = field(default_factory=list)


def serialize_context(data: Mapping[str, Any]) -> str:
    return json.dumps(data, default=_json_default, separators=(",", ":"))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"context value of type {type(value).__name__} is not JSON serializable")


def dynamic_additions(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [value for key, value in data.items() if key.startswith(DYNAMIC_PREFIX)]


def graph_for(base: Graph, data: Mapping[str, Any]) -> Graph:
    additions = dynamic_additions(data)
    return base.extended(additions) if additions else base


def dynamic_addition(graph: Graph, node_id: str, nodes: Any) -> dict[str, Any]:
    """Dynamic nodes sit between their producer and the producer's forward successors."""
    successors = graph.forward_successors(node_id)
    definitions = [
        n.to_dict() if isinstance(n, NodeDefinition) else NodeDefinition.model_validate(n).to_dict()
        for n in nodes
    ]
    edges = [{"source": node_id, "target": d["id"]} for d in definitions]
    edges += [{"source": d["id"], "target": s} for d in definitions for s in successors]
    return {"nodes": definitions, "edges": edges}


def terminal_ids(graph: Graph) -> list[str]:
    return [
        node_id for node_id, edges in graph.outgoing.items()
        if not edges and node_id not in graph.fallback_only
    ]


_MISSING = object()


class RunContext(TrackedContext):
    """A :class:`TrackedContext` that remembers each key's value from before the node's first
    write to it, so writes the store cannot hold are undone instead of left in the run."""

    __slots__ = ("_before",)
    _before: dict[str, Any]

    def _remember(self, key: str) -> None:
        try:
            before = self._before
        except AttributeError:  # created on the first write: most nodes never write
            before = self._before = {}
        if key not in before:
            before[key] = self.data.get(key, _MISSING)

    def set_now(self, key: str, value: Any) -> None:
        self._remember(key)
        super().set_now(key, value)

    def delete_now(self, key: str) -> bool:
        self._remember(key)
        return super().delete_now(key)

    def undo(self, key: str, written: Any) -> None:
        if self.data.get(key, _MISSING) is not written:
            return  # another node wrote the key since: keep its value
        before = getattr(self, "_before", {}).get(key, _MISSING)
        if before is _MISSING:
            self.data.pop(key, None)
        else:
            self.data[key] = before


def _write_name(node_id: str, key: str) -> str:
    return f"context key '{key}' written by node '{node_id}'"


def _plain_scalar(value: Any) -> bool:
    """The common case, decided without a call: a storable scalar."""
    kind = type(value)
    return kind in _PLAIN_SCALARS or (kind is float and math.isfinite(value))


_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})


def refuse_unstorable(node: NodeDefinition, tracked: TrackedContext, outcome: NodeOutcome | None,
                      run_id: str, first_write: int = 0) -> NodeOutcome | None:
    """A failed outcome if the node's output, its awaiting details or its context writes
    (``tracked.deltas`` from ``first_write``) hold a value the store cannot hold; else None.

    Refused writes are removed from ``tracked.deltas`` (so a worker never commits them) and
    undone in ``tracked.data``. The failure is final: the node ran, so a retry or fallback
    would repeat its side effects for the same unstorable result. A node that failed on its
    own keeps its own error; only its unstorable writes are dropped.
    """
    problems: list[str] = []
    refused: dict[str, Any] = {}
    writes = tracked.deltas[first_write:]
    for operation in writes if len(writes) <= 1 else squash(writes):
        if not isinstance(operation.key, str):
            problems.append(f"node '{node.id}' wrote context key {operation.key!r} of type "
                            f"{type(operation.key).__name__}; context keys are strings")
            refused[operation.key] = operation.value
            continue
        if operation.op != "set" or _plain_scalar(operation.value):
            continue
        try:
            check_storable(operation.value, _write_name(node.id, operation.key))
        except UnstorableValueError as exc:
            problems.append(exc.message)
            refused[operation.key] = operation.value
    if outcome is not None and outcome.result is not None:
        if not _plain_scalar(outcome.result.output):
            try:
                check_storable(outcome.result.output, f"the output of node '{node.id}'")
            except UnstorableValueError as exc:
                problems.append(exc.message)
    elif outcome is not None and outcome.awaiting is not None:
        try:
            check_storable(outcome.awaiting, f"the awaiting details of node '{node.id}'")
        except UnstorableValueError as exc:
            problems.append(exc.message)
    if not problems:
        return None
    if refused:
        kept = tracked.deltas[:first_write] + [
            d for d in tracked.deltas[first_write:] if d.key not in refused
        ]
        tracked.deltas[:] = kept
        for key, value in refused.items():
            if isinstance(tracked, RunContext):
                tracked.undo(key, value)
            else:
                tracked.data.pop(key, None)
    attempts = outcome.attempts if outcome is not None else 0
    message = "; ".join(problems)
    if outcome is not None and outcome.error is not None:
        logger.warning("run %s node %s: writes refused: %s", run_id, node.id, message)
        return outcome
    return NodeOutcome(error=NodeError(node.id, message, attempts, "UnstorableValueError",
                                       run_id or None), attempts=attempts)


class NodeEngine:
    """Looks up implementations and runs single nodes; shared by every runtime and worker."""

    def __init__(self, options: RuntimeOptions, registry: Mapping[str, Any] | None = None) -> None:
        self.options = options
        self.registry: dict[str, Any] = {**BUILTIN_NODES, **options.registry, **(registry or {})}
        self._graphs: dict[str, Graph] = {}

    def blueprint(self, blueprint_id: str) -> WorkflowBlueprint:
        try:
            return self.options.blueprints[blueprint_id]
        except KeyError:
            known = ", ".join(sorted(self.options.blueprints)) or "none"
            raise UnknownBlueprintError(
                f"unknown blueprint id '{blueprint_id}' (known: {known}); register it with "
                "FlowRuntime(blueprints=...) or the worker's --blueprints directory"
            ) from None

    def graph(self, blueprint: WorkflowBlueprint) -> Graph:
        cached = self._graphs.get(blueprint.id)
        if cached is None or cached.blueprint is not blueprint:
            check_blueprint(blueprint, self.registry)
            cached = Graph(blueprint)
            self._graphs[blueprint.id] = cached
        return cached

    def fallback_for(self, graph: Graph, node: NodeDefinition) -> tuple[Any, Any]:
        name = node.config.fallback if node.config else None
        if not name:
            return None, None
        # A node id first: that node is fallback-only (never runs on its own), as the
        # reference's docs use it; otherwise a uses key.
        target = graph.nodes.get(name)
        if target is not None and target.uses in self.registry:
            return self.registry[target.uses], target.params or {}
        if name in self.registry:
            return self.registry[name], None
        return None, None

    async def run_node(
        self,
        graph: Graph,
        node: NodeDefinition,
        tracked: TrackedContext,
        node_input: Any,
        *,
        run_id: str,
        iteration: int,
        services: Any,
        signal: CancellationSignal | None = None,
    ) -> NodeOutcome:
        implementation = self.registry.get(node.uses)
        if implementation is None:
            return NodeOutcome(error=NodeError(
                node.id, f"no implementation registered for uses '{node.uses}'", 0,
                "BlueprintValidationError", run_id,
            ))
        engine_writes = len(tracked.deltas)  # the delivered input: checked by routing
        fallback, fallback_params = self.fallback_for(graph, node)
        params = node.params or {}

        def make_context(attempt: int) -> NodeContext:
            # Each attempt gets its own signal: a timeout cancels that attempt only, while
            # cancelling ``signal`` (the run) reaches every attempt.
            return NodeContext(
                context=tracked, input=node_input, params=params,
                dependencies=self.options.dependencies, run_id=run_id, node_id=node.id,
                blueprint_id=graph.blueprint.id, attempt=attempt, iteration=iteration,
                signal=CancellationSignal(signal), engine=services,
            )

        if self.options.middleware:
            from ..middleware import run_with_middleware  # it builds on this package

            outcome = await run_with_middleware(
                self.options.middleware, tracked, node.id, run_id,
                lambda: execute_node(
                    node, implementation, make_context, fallback=fallback,
                    fallback_params=fallback_params, event_bus=self.options.event_bus,
                    run_id=run_id))
        else:
            outcome = await execute_node(
                node, implementation, make_context, fallback=fallback,
                fallback_params=fallback_params, event_bus=self.options.event_bus,
                run_id=run_id,
            )
        result = outcome.result
        if (result is not None and len(tracked.deltas) == engine_writes
                and type(result.output) in _PLAIN_SCALARS):
            return outcome  # the common case, decided without a call
        return refuse_unstorable(node, tracked, outcome, run_id, engine_writes) or outcome


class FlowRuntime:
    """Runs blueprints in memory.

    ``FlowRuntime(blueprints={...}, registry={...}, dependencies={...})``;
    ``await runtime.run(blueprint, {"initial": "context"})`` returns a
    :class:`WorkflowResult`. ``middleware=[...]`` wraps every node (see
    :mod:`flowcraft.middleware`); ``event_store=`` keeps each run's events for replay.
    """

    def __init__(
        self,
        *,
        blueprints: Mapping[str, WorkflowBlueprint] | None = None,
        registry: Mapping[str, Any] | None = None,
        dependencies: Mapping[str, Any] | None = None,
        event_bus: EventBus | None = None,
        max_inline_sleep_seconds: float = 300.0,
        max_node_iterations: int = 1000,
        middleware: Sequence[Any] | None = None,
        event_store: EventStore | None = None,
    ) -> None:
        if event_store is not None:
            event_bus = RecordingBus(event_store, event_bus)
        self.event_store = event_store
        self.options = RuntimeOptions(
            blueprints=dict(blueprints or {}),
            registry=dict(registry or {}),
            dependencies=dict(dependencies or {}),
            event_bus=event_bus,
            max_inline_sleep_seconds=max_inline_sleep_seconds,
            max_node_iterations=max_node_iterations,
            middleware=list(middleware or ()),
        )
        self.engine = NodeEngine(self.options)

    def _engine_for(self, registry: Mapping[str, Any] | None) -> NodeEngine:
        return NodeEngine(self.options, registry) if registry else self.engine

    def _blueprint(
        self, blueprint: WorkflowBlueprint | Mapping[str, Any] | str
    ) -> WorkflowBlueprint:
        if isinstance(blueprint, WorkflowBlueprint):
            return blueprint
        if isinstance(blueprint, str):
            return self.engine.blueprint(blueprint)
        return WorkflowBlueprint.model_validate(blueprint)

    async def run(
        self,
        blueprint: WorkflowBlueprint | Mapping[str, Any] | str,
        initial_context: Mapping[str, Any] | str | None = None,
        *,
        registry: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        signal: CancellationSignal | None = None,
        concurrency: int | None = None,
    ) -> WorkflowResult:
        """Run a blueprint (object, JSON dict, or registered id) to its end or until it awaits.

        Raises before any node runs when the blueprint or the initial context is invalid
        (:class:`~flowcraft.errors.InvalidContextError`: keys the engine owns, values that
        cannot be stored); once nodes run, every failure is reported in the result."""
        if concurrency is not None and (not isinstance(concurrency, int)
                                        or isinstance(concurrency, bool) or concurrency < 0):
            raise InvalidOptionError(
                f"concurrency must be a whole number >= 0 (0 or None: no limit), not "
                f"{concurrency!r}", run_id=run_id)
        data = _initial_data(initial_context)
        return await self._start(blueprint, data, registry=registry, run_id=run_id,
                                 signal=signal, concurrency=concurrency)

    async def _start(
        self,
        blueprint: WorkflowBlueprint | Mapping[str, Any] | str,
        data: dict[str, Any],
        *,
        registry: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        signal: CancellationSignal | None = None,
        concurrency: int | None = None,
    ) -> WorkflowResult:
        """Start a run from a context the engine built itself (a subflow's child run may hold
        ``_inputs.*`` keys)."""
        bp = self._blueprint(blueprint)
        engine = self._engine_for(registry)
        run = _InMemoryRun(engine, bp, data, run_id or str(uuid.uuid4()), signal, concurrency)
        return await run.start()

    async def resume(
        self,
        blueprint: WorkflowBlueprint | Mapping[str, Any] | str,
        serialized_context: Mapping[str, Any] | str,
        resume_data: Mapping[str, Any] | None = None,
        node_id: str | None = None,
        *,
        registry: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        signal: CancellationSignal | None = None,
    ) -> WorkflowResult:
        """Continue an ``awaiting`` run. ``resume_data`` may hold ``output`` (the waiting
        node's output) and ``action`` (drives routing from it)."""
        bp = self._blueprint(blueprint)
        engine = self._engine_for(registry)
        data = (
            json.loads(serialized_context) if isinstance(serialized_context, str)
            else dict(serialized_context)
        )
        if resume_data is not None:
            check_storable(dict(resume_data), "the resume data")
        awaiting = list(data.get(AWAITING_IDS_KEY) or [])
        if not awaiting:
            raise FlowcraftError("cannot resume: the run is not awaiting any node", run_id=run_id)
        target = node_id or awaiting[0]
        if target not in awaiting:
            raise FlowcraftError(
                f"cannot resume node '{target}': it is not awaiting (awaiting: {awaiting})",
                node_id=target, run_id=run_id,
            )
        run = _InMemoryRun(engine, bp, data, run_id or str(uuid.uuid4()), signal, None)
        return await run.resume(target, dict(resume_data or {}))

    def replay(self, events: Any) -> list[Any]:
        """The run's state after each of ``events`` (an event log, as ``event_store`` keeps
        it), without running any node: see :mod:`flowcraft.replay`."""
        from ..replay import replay  # builds on this module

        return replay(events)

    def stepper(
        self,
        blueprint: WorkflowBlueprint | Mapping[str, Any] | str,
        initial_context: Mapping[str, Any] | str | None = None,
        *,
        registry: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        signal: CancellationSignal | None = None,
    ) -> Stepper:
        """A run of ``blueprint`` that executes one node per ``await stepper.next()``, for
        tests and debugging (see :mod:`flowcraft.runtime.stepper`)."""
        from .stepper import Stepper  # builds on this module

        bp = self._blueprint(blueprint)
        engine = self._engine_for(registry)
        data = _initial_data(initial_context)
        return Stepper(engine, bp, data, run_id or str(uuid.uuid4()), signal)


def _initial_data(initial_context: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """A caller's initial context (a mapping or JSON text), checked before a run starts."""
    supplied: Any = initial_context
    if isinstance(supplied, str):
        try:
            supplied = json.loads(supplied)
        except json.JSONDecodeError as exc:
            raise InvalidContextError(
                f"cannot start the run: the initial context is not valid JSON ({exc})"
            ) from None
    return validate_initial_context(supplied)


class _InMemoryRun:
    inline_successors = True
    """A node's task runs the first successor it makes ready (off for a gated run)."""

    def __init__(
        self,
        engine: NodeEngine,
        blueprint: WorkflowBlueprint,
        data: dict[str, Any],
        run_id: str,
        signal: CancellationSignal | None,
        concurrency: int | None,
    ) -> None:
        self.engine = engine
        self.blueprint = blueprint
        self.graph = graph_for(engine.graph(blueprint), data)
        self.data = data
        self.run_id = run_id
        self.signal = signal or CancellationSignal()
        self.bus = engine.options.event_bus
        self.errors: list[NodeError] = []
        self.scheduled: set[tuple[str, int]] = set()
        self.arrivals: dict[tuple[str, int], tuple[set[str], set[str]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.running = 0
        self.idle = asyncio.Event()
        self.idle_waiter: asyncio.Future[None] | None = None
        self.limit = asyncio.Semaphore(concurrency) if concurrency else None
        self.first_arrival: dict[str, str] = {}
        # Set while a node's result is routed: where _schedule hands the next node over.
        self.handoff: list[tuple[str, int, dict[str, Any] | None]] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> WorkflowResult:
        if self.bus is not None:  # the initial context starts an event log's replay
            await self._emit("workflow:start", blueprintId=self.blueprint.id,
                             context=dict(self.data))
        starts = self.graph.start_node_ids
        if self.data.get(AWAITING_IDS_KEY) or any(
            read_record(self.data, node_id) for node_id in starts
        ):
            # A context that already holds progress continues from its frontier.
            self._schedule_frontier()
        else:
            for node_id in starts:
                self._schedule(node_id)
        return await self._finish()

    async def resume(self, node_id: str, resume_data: dict[str, Any]) -> WorkflowResult:
        if self.bus is not None:
            await self._emit("workflow:start", blueprintId=self.blueprint.id, resumed=node_id,
                             context=dict(self.data))
        details = (self.data.get(AWAITING_DETAILS_KEY) or {}).get(node_id) or {}
        self._clear_awaiting(node_id)
        if details.get("reason") == "subflow":
            self._schedule(node_id, resume=resume_data)
        else:
            output = resume_data.get("output")
            if "output" not in resume_data and details.get("reason") == "timer":
                # A parked sleep passes its input on, as one that slept inline does.
                node = self.graph.nodes[node_id]
                output = resolve_input(self.graph, node, self.data).value
            result = NodeResult(output=output, action=resume_data.get("action"))
            try:
                events = self._complete(node_id, resolution_count(self.data, node_id), result, [])
            except ExpressionError as exc:  # a bad condition on the resumed node's edges
                self._fail(NodeError.from_exception(node_id, exc, run_id=self.run_id))
                return await self._finish()
            await self._emit("node:finish", nodeId=node_id, output=output,
                             action=result.action, resumed=True)
            for event in events:
                await safe_emit(self.bus, event)
        self._schedule_frontier()
        return await self._finish()

    async def _finish(self) -> WorkflowResult:
        if self.running:
            self.idle.clear()
            await self._wait_until_idle()
        serialized = self._serialize()
        status = self._status()
        result = WorkflowResult(
            status=status,
            context=public_view(self.data),
            serialized_context=serialized,
            errors=list(self.errors),
            run_id=self.run_id,
        )
        await self._emit("workflow:finish", blueprintId=self.blueprint.id, status=status,
                         errors=[e.to_dict() for e in self.errors])
        logger.info("run %s (%s) finished: %s", self.run_id, self.blueprint.id, status)
        return result

    def _serialize(self) -> str:
        """The context as strict JSON. A value the store cannot hold (changed in place by a
        node, after the checks on its writes) is removed and fails the run, saying where."""
        try:
            return json.dumps(self.data, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            pass
        for key, value in list(self.data.items()):
            try:
                check_storable(value, f"context key '{key}'")
            except UnstorableValueError as exc:
                del self.data[key]
                owner = key[len(OUTPUTS_PREFIX):] if key.startswith(OUTPUTS_PREFIX) else ""
                self.errors.append(NodeError(
                    owner, f"{exc.message} (it was changed in place after it was written, so "
                    "it is left out of the result); write a new value with ctx.context.set",
                    0, type(exc).__name__, self.run_id))
        return json.dumps(self.data, separators=(",", ":"), allow_nan=False)

    def _fail(self, error: NodeError) -> None:
        self.errors.append(error)
        logger.warning("run %s node %s failed: %s", self.run_id, error.node_id, error.message)

    async def _wait_until_idle(self) -> None:
        """Wait for the running nodes; when the run is cancelled, cancel them instead."""
        # One future, woken by the last node or by the signal: no tasks to wait with.
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()
        self.idle_waiter = woken

        def wake_from_any_thread() -> None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(_wake, woken)

        self.signal.add_callback(wake_from_any_thread)
        try:
            if not self.idle.is_set():
                await woken
        finally:
            self.idle_waiter = None
            self.signal.remove_callback(wake_from_any_thread)
            stop = self.signal.is_set() or not self.idle.is_set()  # cancelled, or we were
            tasks = list(self.tasks) if stop else []
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def _now_idle(self) -> None:
        self.idle.set()
        if self.idle_waiter is not None:
            _wake(self.idle_waiter)

    def _status(self) -> RunStatus:
        if self.signal.is_set():
            return "cancelled"
        if self.errors:
            return "failed"
        if self.data.get(AWAITING_IDS_KEY):
            return "awaiting"
        if all(read_record(self.data, t) for t in terminal_ids(self.graph)):
            return "completed"
        return "stalled"

    # -- scheduling ---------------------------------------------------------------------

    def _schedule_frontier(self) -> None:
        ready, skip = ready_frontier(self.graph, self.data)
        for node_id in skip:
            self._skip(node_id)
        for node_id in ready:
            self._schedule(node_id)

    def _schedule(self, node_id: str, first_arrival: str | None = None,
                  resume: dict[str, Any] | None = None) -> None:
        generation = resolution_count(self.data, node_id)
        key = (node_id, generation)
        if key in self.scheduled or self.signal.is_set():
            return
        self.scheduled.add(key)
        if generation >= self.engine.options.max_node_iterations:
            self.errors.append(NodeError(
                node_id, f"node ran {generation} times, the limit of max_node_iterations; "
                "a loop without a reachable exit?", 0, "FlowcraftError", self.run_id,
            ))
            return
        if first_arrival is not None:
            self.first_arrival[node_id] = first_arrival
        self.running += 1
        if self.handoff is not None and not self.handoff:
            # The finishing node's task runs this one next: no task of its own.
            self.handoff.append((node_id, generation, resume))
            return
        self._spawn(node_id, generation, resume)

    def _spawn(self, node_id: str, generation: int, resume: dict[str, Any] | None) -> None:
        task = asyncio.get_running_loop().create_task(self._execute(node_id, generation, resume))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _execute(self, node_id: str, generation: int,
                       resume: dict[str, Any] | None) -> None:
        job: tuple[str, int, dict[str, Any] | None] | None = (node_id, generation, resume)
        while job is not None:
            node_id, generation, resume = job
            job = None
            handoff: list[tuple[str, int, dict[str, Any] | None]] = []
            try:
                if self.limit is not None or not self.inline_successors:
                    async with self.limit or contextlib.nullcontext():
                        await self._execute_node(node_id, generation, resume, None)
                else:
                    await self._execute_node(node_id, generation, resume, handoff)
                    if handoff:
                        job = handoff.pop()
            except asyncio.CancelledError:
                self.running -= len(handoff)  # the run is torn down: they never run
                handoff.clear()
                raise
            except Exception as exc:  # a bug or a bad expression: fail the run, not the loop
                logger.exception("run %s node %s: engine error", self.run_id, node_id)
                self.errors.append(NodeError(node_id, str(exc), 0, type(exc).__name__,
                                             self.run_id))
            finally:
                for left in handoff:  # not taken over (an error, a cancellation): its own task
                    self._spawn(*left)
                self.running -= 1
                if self.running == 0 and job is None:
                    self._now_idle()

    async def _execute_node(self, node_id: str, generation: int, resume: dict[str, Any] | None,
                            handoff: list[Any] | None) -> None:
        """Run one node and route its result; with ``handoff``, the first node that result
        makes ready is put there for the caller to run next instead of in a task."""
        if self.signal.is_set():
            return
        node = self.graph.nodes[node_id]
        try:
            resolved = resolve_input(self.graph, node, self.data,
                                     self.first_arrival.pop(node_id, None))
        except ExpressionError as exc:  # a transform on an incoming edge: the node never ran
            error = NodeError.from_exception(node_id, exc, attempt=0, run_id=self.run_id)
            self._fail(error)
            await self._emit("node:error", nodeId=node_id, error=error.to_dict())
            return
        tracked = RunContext(self.data)
        if resolved.store:  # the engine's own write (checked by routing): never undone
            TrackedContext.set_now(tracked, INPUTS_PREFIX + node_id, resolved.value)
        if self.bus is not None:
            await self._emit("node:start", nodeId=node_id, input=resolved.value)
        logger.debug("run %s node %s: start (iteration %d)", self.run_id, node_id, generation)
        services = _RunServices(self, resume)
        outcome = await self.engine.run_node(
            self.graph, node, tracked, resolved.value, run_id=self.run_id,
            iteration=generation, services=services, signal=self.signal,
        )
        if self.signal.is_set():
            return
        if outcome.awaiting is not None:
            self._park(node_id, outcome.awaiting)
            await self._emit("node:finish", nodeId=node_id, awaiting=outcome.awaiting)
            return
        if outcome.error is not None:
            self.errors.append(outcome.error)
            logger.warning("run %s node %s failed: %s", self.run_id, node_id,
                           outcome.error.message)
            await self._emit("node:error", nodeId=node_id, error=outcome.error.to_dict())
            return
        assert outcome.result is not None
        self.handoff = handoff
        try:
            events = self._complete(node_id, generation, outcome.result, tracked.deltas)
        except ExpressionError as exc:  # a condition on its outgoing edges: final, as a failure
            error = NodeError.from_exception(node_id, exc, attempt=outcome.attempts,
                                             run_id=self.run_id)
            self._fail(error)
            await self._emit("node:error", nodeId=node_id, error=error.to_dict())
            return
        finally:
            self.handoff = None
        if self.bus is not None:
            await self._emit("node:finish", nodeId=node_id, output=outcome.result.output,
                             action=outcome.result.action)
            for event in events:
                await safe_emit(self.bus, event)

    # -- bookkeeping (synchronous: no awaits between a decision and its effects) --------

    def _complete(self, node_id: str, generation: int, result: NodeResult,
                  deltas: list[Any]) -> list[FlowcraftEvent]:
        events: list[FlowcraftEvent] = []
        if self.bus is not None:
            events.extend(
                FlowcraftEvent("context:change", {
                    "runId": self.run_id, "nodeId": node_id, "op": d.op, "key": d.key,
                    "value": d.value,
                }) for d in deltas
            )
        graph = self.graph
        addition = None
        if result.dynamic_nodes:
            addition = dynamic_addition(graph, node_id, result.dynamic_nodes)
            graph = graph.extended([addition])

        def observe(edge: Any, verdict: bool) -> None:
            events.append(FlowcraftEvent("edge:evaluate", {
                "runId": self.run_id, "source": edge.source, "target": edge.target,
                "condition": edge.condition, "result": verdict,
            }))

        # Conditions may read the node's own output from the context; if one cannot be
        # evaluated, the previous output (a loop's last iteration) stays.
        key = output_key(node_id)
        previous = self.data.get(key, _MISSING)
        self.data[key] = result.output
        try:
            taken = route(graph, node_id, result.output, result.action, self.data,
                          observe if self.bus is not None else None)
        except ExpressionError:
            if previous is _MISSING:
                del self.data[key]
            else:
                self.data[key] = previous
            raise
        if addition is not None:
            self.data[DYNAMIC_PREFIX + node_id] = addition
            self.graph = graph
        self.data[record_key(node_id)] = completed_record(generation, taken, result.action)
        self._propagate(node_id, events)
        return events

    def _propagate(self, source_id: str, events: list[FlowcraftEvent]) -> None:
        """Tell each successor that ``source_id`` resolved; run, skip or keep waiting."""
        stack = [source_id]
        graph = self.graph
        while stack:
            source = stack.pop()
            record = read_record(self.data, source)
            assert record is not None
            edges = graph.outgoing[source]
            delivered_to = set() if record.skipped else {edges[i].target for i in record.taken}
            for target in dict.fromkeys(edge.target for edge in edges):
                if graph.is_back_edge(source, target):
                    if target in delivered_to:
                        self._schedule(target)
                    continue
                decision = self._arrive(source, target, target in delivered_to)
                if decision is JoinDecision.RUN:
                    self._schedule(target, first_arrival=source)
                elif decision is JoinDecision.SKIP and self._skip(target, events):
                    stack.append(target)

    def _arrive(self, source: str, target: str, delivered: bool) -> JoinDecision:
        if resolved_for_good(self.graph, self.data, target):
            return JoinDecision.WAIT
        if self.graph.forward_predecessors.get(target) == (source,):
            # The only way in (chains, fan-out branches): no join bookkeeping needed.
            return JoinDecision.RUN if delivered else JoinDecision.SKIP
        key = (target, resolution_count(self.data, target))
        arrivals = self.arrivals.get(key)
        if arrivals is None:
            # Derived once from the records (which may already hold predecessors whose own
            # arrival is still to come); later arrivals add themselves. Sets, so a source is
            # never counted twice.
            arrivals = self.arrivals[key] = join_arrivals(self.graph, self.data, target)
        arrivals[0].add(source)
        if delivered:
            arrivals[1].add(source)
        node = self.graph.nodes[target]
        expected = len(self.graph.forward_predecessors.get(target, ()))
        return join_decision(node.join_strategy, expected, len(arrivals[0]), len(arrivals[1]))

    def _skip(self, node_id: str, events: list[FlowcraftEvent] | None = None) -> bool:
        generation = resolution_count(self.data, node_id)
        key = (node_id, generation)
        if key in self.scheduled:
            return False
        self.scheduled.add(key)
        self.data[record_key(node_id)] = skipped_record(generation)
        logger.debug("run %s node %s: skipped", self.run_id, node_id)
        if events is not None and self.bus is not None:
            events.append(FlowcraftEvent("node:skipped", {"runId": self.run_id, "nodeId": node_id}))
        if events is None:
            self._propagate(node_id, [])
            return False
        return True

    def _park(self, node_id: str, details: dict[str, Any]) -> None:
        ids = list(self.data.get(AWAITING_IDS_KEY) or [])
        if node_id not in ids:
            ids.append(node_id)
        all_details = dict(self.data.get(AWAITING_DETAILS_KEY) or {})
        all_details[node_id] = details
        self.data[AWAITING_IDS_KEY] = ids
        self.data[AWAITING_DETAILS_KEY] = all_details
        logger.info("run %s node %s: awaiting (%s)", self.run_id, node_id,
                    details.get("reason", "external_event"))

    def _clear_awaiting(self, node_id: str) -> None:
        ids = [i for i in (self.data.get(AWAITING_IDS_KEY) or []) if i != node_id]
        details = dict(self.data.get(AWAITING_DETAILS_KEY) or {})
        details.pop(node_id, None)
        if ids:
            self.data[AWAITING_IDS_KEY] = ids
            self.data[AWAITING_DETAILS_KEY] = details
        else:
            self.data.pop(AWAITING_IDS_KEY, None)
            self.data.pop(AWAITING_DETAILS_KEY, None)

    async def _emit(self, event_type: str, **payload: Any) -> None:
        if self.bus is not None:
            await safe_emit(self.bus, FlowcraftEvent(event_type, {"runId": self.run_id, **payload}))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _RunServices:
    """``ctx.engine`` for nodes of an in-memory run."""

    def __init__(self, run: _InMemoryRun, resume: dict[str, Any] | None) -> None:
        self._run = run
        self._resume = resume

    async def sleep(self, ctx: NodeContext, seconds: float) -> None:
        if seconds <= self._run.engine.options.max_inline_sleep_seconds:
            await asyncio.sleep(seconds)
            return
        wake_up_at = datetime.now(UTC) + timedelta(seconds=seconds)
        raise AwaitingSignal({"reason": "timer", "wakeUpAt": wake_up_at.isoformat()})

    async def run_subflow(self, ctx: NodeContext, blueprint_id: str) -> Any:
        return await run_subflow(self._run.engine, ctx, blueprint_id, self._resume)


async def run_subflow(engine: NodeEngine, ctx: NodeContext, blueprint_id: str,
                      resume: dict[str, Any] | None = None) -> Any:
    """The ``subflow`` node: run a child blueprint in this process and map its results."""
    child = engine.blueprint(blueprint_id)
    parent = ctx.context
    child_run_id = f"{ctx.run_id}/{ctx.node_id}"
    runtime = FlowRuntime.__new__(FlowRuntime)
    runtime.options = engine.options
    runtime.engine = engine
    state_key = f"_subflowState.{ctx.node_id}"
    saved = parent.get_now(state_key)
    # The child run is cancelled with this node (its timeout, or the parent run's cancellation).
    if resume is not None and saved:
        result = await runtime.resume(child, saved, resume, run_id=child_run_id,
                                      signal=ctx.signal)
    else:
        initial: dict[str, Any] = {}
        mapping = ctx.params.get("inputs")
        if isinstance(mapping, Mapping):
            for child_key, parent_ref in mapping.items():
                value = parent.get_now(parent_ref)
                if value is None:
                    value = parent.get_now(f"_outputs.{parent_ref}")
                initial[child_key] = value
        elif ctx.input is not None:
            for start_id in start_node_ids(child):
                initial[INPUTS_PREFIX + start_id] = ctx.input
        result = await runtime._start(child, initial, run_id=child_run_id, signal=ctx.signal)
    if result.status == "awaiting":
        parent.set_now(state_key, result.serialized_context)
        raise AwaitingSignal({"reason": "subflow", "blueprintId": blueprint_id,
                              "childAwaiting": result.context.get(AWAITING_IDS_KEY)})
    if saved is not None:
        parent.delete_now(state_key)
    if result.status != "completed":
        reason = result.errors[0].message if result.errors else result.status
        raise FlowcraftError(
            f"subflow '{blueprint_id}' of node '{ctx.node_id}' ended {result.status}: {reason}",
            node_id=ctx.node_id, run_id=ctx.run_id,
        )
    final = result.context
    outputs = ctx.params.get("outputs")
    if isinstance(outputs, Mapping):
        for parent_key, child_ref in outputs.items():
            value = final.get(f"_outputs.{child_ref}", final.get(child_ref))
            parent.set_now(parent_key, value)
    child_graph = engine.graph(child)
    terminals = terminal_ids(child_graph)
    if len(terminals) == 1:
        return final.get(f"_outputs.{terminals[0]}")
    return {t: final.get(f"_outputs.{t}") for t in terminals if f"_outputs.{t}" in final}
