"""``FlowRuntime``: runs blueprints in this process.

A run is a set of asyncio tasks, one per node execution (a node's task runs
the first successor it makes ready). When a node finishes, its output, context
writes and routing record land in the run's context dict, and
:func:`flowcraft.core.successors.decide` — the function the distributed
workers use too — says which successors run, which are skipped, and which
keep waiting at a join. All decisions are made synchronously between awaits,
so concurrent nodes never race on the bookkeeping. Single nodes are run by
the shared :class:`~flowcraft.core.engine.NodeEngine`. Once nodes run,
``FlowRuntime.run`` never raises: every failure is in the result.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..analysis import start_node_ids
from ..blueprint import WorkflowBlueprint
from ..context import TrackedContext, check_storable, public_view, validate_initial_context
from ..core.engine import NodeEngine, RunContext
from ..core.executor import NodeError
from ..core.graph import DYNAMIC_PREFIX, dynamic_addition, graph_for, terminal_ids
from ..core.options import RuntimeOptions
from ..core.results import RunStatus, WorkflowResult
from ..core.routing import (
    AWAITING_DETAILS_KEY,
    AWAITING_IDS_KEY,
    INPUTS_PREFIX,
    OUTPUTS_PREFIX,
    output_key,
    read_record,
    record_key,
    resolution_count,
    resolve_input,
    route,
    shared_completed_record,
    shared_skipped_record,
)
from ..core.successors import JoinTally, decide, frontier
from ..errors import (
    ExpressionError,
    FlowcraftError,
    InvalidContextError,
    InvalidOptionError,
    UnstorableValueError,
)
from ..events import EventBus, EventStore, FlowcraftEvent, RecordingBus, safe_emit
from ..nodes.base import AwaitingSignal, CancellationSignal, NodeContext, NodeResult

if TYPE_CHECKING:
    from .stepper import Stepper

logger = logging.getLogger("flowcraft.runtime")

_MISSING = object()

MAX_TASKS_PER_RUN = 10_000
"""Node executions of one run that have a task at once; more ready nodes wait in order."""

__all__ = ["FlowRuntime", "NodeEngine", "RuntimeOptions", "WorkflowResult", "run_subflow"]


class FlowRuntime:
    """Runs blueprints in memory.

    ``FlowRuntime(blueprints={...}, registry={...}, dependencies={...})``;
    ``await runtime.run(blueprint, {"initial": "context"})`` returns a
    :class:`WorkflowResult`. ``middleware=[...]`` wraps every node (see
    :mod:`flowcraft.core.middleware`); ``event_store=`` keeps each run's events for replay.
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
        run = _InMemoryRun(engine, bp, data, run_id or new_run_id(), signal, concurrency)
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
        run = _InMemoryRun(engine, bp, data, run_id or new_run_id(), signal, None)
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
        return Stepper(engine, bp, data, run_id or new_run_id(), signal)


def new_run_id() -> str:
    """A random (version 4) UUID for a run started without an id: from the ``random`` module,
    which costs a third of ``uuid.uuid4()``'s system call. Run ids name runs; they are not
    secrets."""
    bits = (random.getrandbits(128) & _UUID_CLEAR) | _UUID_V4
    text = f"{bits:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


_UUID_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))  # the version and variant bits
_UUID_V4 = (0x4000 << 64) | (0x8000 << 48)


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
        self.tally = JoinTally()
        self.backlog: collections.deque[tuple[str, int, dict[str, Any] | None]] = (
            collections.deque())
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
            return _to_json(self.data)
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
        return _to_json(self.data)

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
        decision = frontier(self.graph, self.data)
        self._propagate([node_id for node_id in decision.skip if self._skip(node_id, None)],
                        None)
        for ready in decision.ready:
            self._schedule(ready.node_id)

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
        if len(self.tasks) >= MAX_TASKS_PER_RUN:
            # A very wide fan-out: the node waits for a task to take it (each task costs a few
            # KB; 100,000 of them at once would cost hundreds of MB).
            self.backlog.append((node_id, generation, resume))
            return
        task = asyncio.get_running_loop().create_task(self._execute(node_id, generation, resume))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _execute(self, node_id: str, generation: int,
                       resume: dict[str, Any] | None) -> None:
        job: tuple[str, int, dict[str, Any] | None] | None = (node_id, generation, resume)
        handoff: list[tuple[str, int, dict[str, Any] | None]] = []  # emptied every round
        while job is not None:
            node_id, generation, resume = job
            job = None
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
                handoff.clear()
                self.running -= 1
                if job is None and self.backlog and not self.signal.is_set():
                    job = self.backlog.popleft()
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
        self.data[record_key(node_id)] = shared_completed_record(generation, taken,
                                                               result.action)
        self.scheduled.discard((node_id, generation))  # what runs next is a new generation
        self._propagate([node_id], events)
        return events

    def _propagate(self, sources: list[str], events: list[FlowcraftEvent] | None) -> None:
        """Apply what :func:`~flowcraft.core.successors.decide` says follows ``sources``:
        schedule the successors that run now; skip those that can no longer run, and go on
        with what follows them."""
        while sources:
            decision = decide(self.graph, self.data, sources, self.tally)
            for node_id, source in zip(decision.ready_ids, decision.ready_sources, strict=True):
                self._schedule(node_id, first_arrival=source)
            sources = [node_id for node_id in decision.skip if self._skip(node_id, events)]

    def _skip(self, node_id: str, events: list[FlowcraftEvent] | None) -> bool:
        """Record that ``node_id`` is skipped (unless it was already decided this generation)."""
        generation = resolution_count(self.data, node_id)
        key = (node_id, generation)
        if key in self.scheduled:  # it runs, or ran and failed, in this generation
            return False
        self.data[record_key(node_id)] = shared_skipped_record(generation)
        logger.debug("run %s node %s: skipped", self.run_id, node_id)
        if events is not None and self.bus is not None:
            events.append(FlowcraftEvent("node:skipped", {"runId": self.run_id, "nodeId": node_id}))
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


_JSON_SLICE = 2048
# Made once: json.dumps() with options makes an encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _to_json(data: dict[str, Any]) -> str:
    """``data`` as compact strict JSON. A large context is written a slice of keys at a time:
    the encoder holds every piece of its output until it joins them, which for a run of
    100,000 nodes is several times the size of the text."""
    if len(data) <= _JSON_SLICE:
        return _ENCODER.encode(data)
    items = iter(data.items())
    parts = []
    while piece := dict(itertools.islice(items, _JSON_SLICE)):
        parts.append(_ENCODER.encode(piece)[1:-1])
    return "{" + ",".join(parts) + "}"


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _RunServices:
    """``ctx.engine`` for nodes of an in-memory run: an
    :class:`~flowcraft.nodes.base.EngineServices` (a sleep up to
    ``max_inline_sleep_seconds`` waits in place, a longer one parks the run; a subflow
    runs in this process, resumed from its saved state when the run is)."""

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
