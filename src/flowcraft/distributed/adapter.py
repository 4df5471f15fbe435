"""``BaseDistributedAdapter``: a worker and client of the distributed engine, by composition.

An adapter puts four parts together and offers them as one object:

``backend`` (:class:`~flowcraft.distributed.backend.Backend`)
    The job queue, the runs' stored contexts and the status records — the only
    thing a backend supplies (:meth:`BaseDistributedAdapter.create_backend`).
``algorithm`` (:class:`~flowcraft.distributed.algorithm.JobAlgorithm`)
    The job algorithm, written once for every queue and database; its module
    docstring describes it step by step.
``worker_loop`` (:class:`~flowcraft.distributed.polling.WorkerLoop`)
    Polls the queue and hands the messages to the algorithm (``start``,
    ``run_forever``, ``stop``).
``run_client`` (:class:`~flowcraft.distributed.runs.RunClient`)
    Starts, observes, reconciles and resumes runs.

The worker's options live in one :class:`~flowcraft.distributed.options.WorkerSettings`
(``settings``) that the parts share; ``adapter.lease_seconds`` and the other
options read and write it. A few knobs belong to a part — ``max_delay_seconds``
to the queue, ``prefetch_job_seconds`` to the polling loop, a cloud adapter's
``retention_seconds`` to its status store — and read and write through to it; a
subclass may still set one as a plain class attribute (``max_delay_seconds =
2.0``), which is handed to the part when the adapter is built.

The in-process backend (:mod:`flowcraft.distributed.inprocess`), the AWS adapter
and the Azure adapter are such adapters; another queue or database is one more
:meth:`~BaseDistributedAdapter.create_backend`.
"""

from __future__ import annotations

import abc
import inspect
import operator
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, Generic, TypeVar, cast, overload

from ..blueprint import WorkflowBlueprint
from ..core.engine import NodeEngine
from ..core.options import RuntimeOptions
from ..core.results import WorkflowResult
from ..events import EventBus
from .algorithm import JobAlgorithm
from .algorithm import JobOutcome as JobOutcome
from .backend import FINAL_STATUSES as FINAL_STATUSES
from .backend import RESTING_STATUSES as RESTING_STATUSES
from .backend import Backend
from .backend import QueueMessage as QueueMessage
from .backend import now_iso as now_iso
from .backend import parse_timestamp as parse_timestamp
from .context import DistributedContext
from .coordination import CoordinationStore
from .homes import run_context
from .job import JobPayload
from .options import WorkerSettings
from .polling import WorkerLoop
from .progress import job_misfit as job_misfit
from .runs import RunClient

T = TypeVar("T")


_DELEGATED = "_delegated_attributes"
"""Where a class lists the :class:`Delegated` attributes it declares (by name)."""


class Delegated(Generic[T]):
    """An adapter attribute that one of its parts holds: ``Delegated("backend.queue")`` named
    ``max_delay_seconds`` reads and writes ``adapter.backend.queue.max_delay_seconds``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._part = operator.attrgetter(path)
        self.name = ""

    def __set_name__(self, owner: type[Any], name: str) -> None:
        self.name = name
        declared = vars(owner).get(_DELEGATED)
        if declared is None:
            declared = {}
            setattr(owner, _DELEGATED, declared)
        declared[name] = self

    @overload
    def __get__(self, obj: None, owner: type[Any] | None = None) -> Delegated[T]: ...
    @overload
    def __get__(self, obj: object, owner: type[Any] | None = None) -> T: ...

    def __get__(self, obj: object | None, owner: type[Any] | None = None) -> T | Delegated[T]:
        if obj is None:
            return self
        return cast(T, getattr(self._part(obj), self.name))

    def __set__(self, obj: object, value: T) -> None:
        setattr(self._part(obj), self.name, value)


class BaseDistributedAdapter(abc.ABC):
    """A worker (and client) of the distributed engine over the backend a subclass builds.

    Args:
        runtime_options: ``runtime.options`` of a :class:`~flowcraft.FlowRuntime`
            (blueprints, registry, dependencies).
        coordination_store: shared by all workers (``any`` joins, failure markers).
        event_bus: receives node and job events.
        concurrency: jobs this process runs at once.
        lease_seconds: how long a claim on a node lasts without renewal; also the
            message visibility the worker keeps while it runs.
        max_receive_count: a message received more often than this is a poison
            message: removed (dead-lettered where possible) and its run failed.
        local_continuation: run a node's next node in the same worker instead of
            a queue round trip (it is claimed in the same write); of several next
            nodes, also one per free job slot of the polling worker.
        status_touch_seconds: at most one ``lastUpdated`` write per run and
            worker in this interval; the reconciler's threshold must exceed it.
        unknown_blueprint_grace_seconds: how long a job naming a blueprint no worker
            seen so far has is left for one that has it (a rolling deploy), counted
            from the first worker that saw it; then its run fails.
        hard_receive_limit: a message received more often than this is removed even
            if it never started an attempt (default ten times ``max_receive_count``):
            the last resort against garbage that no check recognises.
        map_ledger_min_items: a ``batch-scatter`` over at least this many items runs as a
            map ledger (:mod:`flowcraft.distributed.ledger`): its items in chunk items of
            their own, so the run's item does not grow with the map; smaller maps add one
            node per item to the run, as in memory.
        map_chunk_items: at most this many items per chunk of a map ledger (fewer when
            the items are large, so a chunk's item stays small); a ``chunkSize`` given to
            the scatter takes its place.
        lean_writes: claims and commits that need not read the run back do not (on
            DynamoDB: :mod:`flowcraft.distributed.snapshots`, and commits decided by their
            own record or a counted join). Every worker counts join arrivals either way;
            workers of earlier versions do not, so a deployment upgraded from one runs
            with ``False`` until all its workers are new, then turns it on.
    """

    max_delay_seconds = Delegated[float]("backend.queue")
    """The longest delay the queue accepts on a message (longer sleeps are chained)."""
    prefetch_job_seconds = Delegated[float]("worker_loop")
    """See :attr:`WorkerLoop.prefetch_job_seconds`."""

    concurrency = Delegated[int]("settings")
    lease_seconds = Delegated[float]("settings")
    max_receive_count = Delegated[int]("settings")
    local_continuation = Delegated[bool]("settings")
    status_touch_seconds = Delegated[float]("settings")
    poll_wait_seconds = Delegated[float]("settings")
    batch_size = Delegated[int]("settings")
    shutdown_timeout_seconds = Delegated[float]("settings")
    worker_id = Delegated[str]("settings")
    unknown_blueprint_grace_seconds = Delegated[float]("settings")
    hard_receive_limit = Delegated[int]("settings")
    map_ledger_min_items = Delegated[int]("settings")
    map_chunk_items = Delegated[int]("settings")
    lean_writes = Delegated[bool]("settings")

    runtime_options = Delegated[RuntimeOptions]("algorithm")
    engine = Delegated[NodeEngine]("algorithm")
    coordination_store = Delegated[CoordinationStore]("algorithm")
    event_bus = Delegated[EventBus | None]("algorithm")

    def __init__(
        self,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore,
        event_bus: EventBus | None = None,
        *,
        concurrency: int = 8,
        lease_seconds: float = 60.0,
        max_receive_count: int = 5,
        local_continuation: bool = True,
        status_touch_seconds: float = 15.0,
        poll_wait_seconds: float = 20.0,
        batch_size: int = 10,
        shutdown_timeout_seconds: float = 30.0,
        worker_id: str | None = None,
        unknown_blueprint_grace_seconds: float = 300.0,
        hard_receive_limit: int | None = None,
        map_ledger_min_items: int = 32,
        map_chunk_items: int = 100,
        lean_writes: bool = True,
    ) -> None:
        if map_ledger_min_items < 1 or map_chunk_items < 1:
            raise ValueError("map_ledger_min_items and map_chunk_items must be at least 1")
        self.settings = WorkerSettings(
            concurrency=concurrency,
            lease_seconds=lease_seconds,
            max_receive_count=max_receive_count,
            local_continuation=local_continuation,
            status_touch_seconds=status_touch_seconds,
            poll_wait_seconds=poll_wait_seconds,
            batch_size=batch_size,
            shutdown_timeout_seconds=shutdown_timeout_seconds,
            worker_id=(worker_id
                       or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"),
            unknown_blueprint_grace_seconds=unknown_blueprint_grace_seconds,
            hard_receive_limit=(hard_receive_limit if hard_receive_limit is not None
                                else 10 * max_receive_count),
            map_ledger_min_items=map_ledger_min_items,
            map_chunk_items=map_chunk_items,
            lean_writes=lean_writes,
        )
        self.backend: Backend = self.create_backend()
        self.algorithm = JobAlgorithm(
            self.backend, NodeEngine(runtime_options), coordination_store, self.settings,
            runtime_options=runtime_options,
            event_bus=event_bus if event_bus is not None else runtime_options.event_bus)
        self.worker_loop = WorkerLoop(self.backend, self.algorithm, self.settings)
        self.run_client = RunClient(self.backend, self.algorithm)
        self._hand_class_attributes_to_parts()

    @abc.abstractmethod
    def create_backend(self) -> Backend:
        """The queue, run store and status store this adapter runs on. Called once, by
        ``__init__``, once ``settings`` is set (the queue's visibility timeout is the
        worker's ``lease_seconds``)."""

    def _hand_class_attributes_to_parts(self) -> None:
        """Hand the parts the values set as plain class attributes in place of delegated
        ones, by a subclass (``max_delay_seconds = 2.0``) or on the class
        (``SqsAdapter.retention_seconds = None``)."""
        cls = type(self)
        delegated: dict[str, Delegated[Any]] = {}
        for klass in reversed(cls.__mro__):
            delegated.update(vars(klass).get(_DELEGATED, {}))
        for name, descriptor in delegated.items():
            value = inspect.getattr_static(cls, name)
            if not isinstance(value, Delegated):
                descriptor.__set__(self, value)

    def create_context(self, run_id: str) -> DistributedContext:
        """The stored context of one run."""
        return run_context(self.backend.runs, run_id)

    # -- the worker ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling the queue in the background (returns at once)."""
        await self.worker_loop.start()

    async def run_forever(self) -> None:
        await self.worker_loop.run_forever()

    async def stop(self, timeout_seconds: float | None = None) -> None:
        """Stop polling; let running jobs finish for up to ``timeout_seconds``, then cancel
        them and release what they hold (their messages become visible again). Receives
        still on the wire are waited for and what they return is put back, before the
        clients may close."""
        await self.worker_loop.stop(timeout_seconds)

    async def handle_job(self, job: JobPayload | Mapping[str, Any] | str | bytes, *,
                         requeue_deferred: bool = True) -> JobOutcome:
        """Process one job (for serverless handlers that receive messages themselves).

        A job that must wait (its node is leased elsewhere, the run needs another
        blueprint version or a blueprint this worker lacks) is never dropped: it is sent
        again with the delay the wait needs and ``"requeued"`` returned, so the caller
        acknowledges the incoming message. With ``requeue_deferred=False`` it returns
        ``"deferred"`` instead and the caller must have the message delivered again.
        Raises :class:`~flowcraft.errors.InvalidJobError` for a body that is not a job.
        """
        return await self.algorithm.handle_job(job, requeue_deferred=requeue_deferred)

    async def handle_message(self, message: QueueMessage, *,
                             requeue_deferred: bool = False) -> tuple[JobOutcome, float]:
        """Process one received message as the polling loop does, for handlers that are
        given messages (a Lambda SQS event, a Functions queue trigger).

        Unlike :meth:`handle_job`, an unreadable message is dead-lettered (its run failed
        where it names one) and ``"dropped"`` returned, and the receive count is checked
        (hard limit; a job that only waited goes back as a fresh message before its count
        runs out). A message with ``handle=None`` is owned by the trigger: it is never
        deleted here. Returns the outcome and, for ``"deferred"``, the seconds to wait;
        with ``requeue_deferred`` a deferred job is sent again with that delay instead
        (``"requeued"``).
        """
        return await self.algorithm.handle_message(message, requeue_deferred=requeue_deferred)

    # -- the client ----------------------------------------------------------------------------

    async def start_workflow(
        self,
        blueprint: WorkflowBlueprint | str,
        initial_context: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
    ) -> str:
        """Store the initial context and status, enqueue the start nodes; return the run id.

        Raises :class:`~flowcraft.errors.InvalidContextError` for an initial context that
        cannot start a run, and :class:`~flowcraft.errors.RunAlreadyExistsError` when
        ``run_id`` names an existing run (which is left as it is)."""
        return await self.run_client.start_workflow(blueprint, initial_context, run_id=run_id)

    async def get_run_status(self, run_id: str) -> dict[str, Any] | None:
        return await self.run_client.get_run_status(run_id)

    async def wait_for_result(self, run_id: str, timeout: float = 60.0,
                              poll_interval: float = 0.25) -> WorkflowResult:
        """Poll until the run rests (completed, failed, cancelled or awaiting)."""
        return await self.run_client.wait_for_result(run_id, timeout, poll_interval)

    async def reconcile(self, run_id: str) -> list[str]:
        """Re-enqueue the ready frontier of a run (nodes neither done nor leased); write
        skips that were lost; publish completion if it was missed. Returns the node ids
        enqueued."""
        return await self.run_client.reconcile(run_id)

    async def resume_with_action(self, run_id: str, action: str | None = None,
                                 output: Any = None, node_id: str | None = None,
                                 *, blueprint_id: str | None = None) -> list[str]:
        """Complete an awaiting node with ``output``; ``action`` routes from it. Returns the
        node ids enqueued."""
        return await self.run_client.resume_with_action(run_id, action, output, node_id,
                                                        blueprint_id=blueprint_id)
