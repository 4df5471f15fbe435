"""``BaseDistributedAdapter``: the job algorithm, written once for every queue and database.

A subclass supplies the service primitives — a :class:`DistributedContext`
per run, sending, receiving, acknowledging and delaying queue messages, and
reading and writing status records — and inherits the algorithm below. The
in-process backend (:mod:`flowcraft.distributed.inprocess`), the AWS adapter
and the Azure adapter all run exactly this code.

The job algorithm
=================

A job names (run, blueprint, node, iteration). Delivery is at least once: any
job may arrive twice, late, or after the worker that had it died at any
point. Nor is a message trusted: anyone who can send to the queue can send
anything, so a job only runs what the run's stored state confirms. Each step
says why repeating it is safe.

0. **Starting a run** stores its context with a conditional create (a run id
   that is taken is refused with ``RunAlreadyExistsError`` and the existing
   run left untouched), carrying the blueprint id; then the status record,
   then the start jobs.

1. **Parse and look up.** An unparseable message is removed (or
   dead-lettered) and logged with its message id; the run it names is marked
   ``failed`` with the reason — only if that run has a status record: garbage
   naming a run that never existed creates none. A job naming a blueprint
   this worker lacks is left for a worker that has it (a rolling deploy) for
   ``unknown_blueprint_grace_seconds`` from the first sighting by any worker
   (kept in the coordination store); then removed and its run failed. It is
   dropped at once when no such run is stored, or the run belongs to another
   blueprint. A message received more than ``hard_receive_limit`` times
   (far above ``max_receive_count``) is removed whatever it is: the last
   resort against garbage that no check recognises. A job that must wait
   (its node is leased elsewhere, or its run needs another blueprint version
   or a blueprint this worker lacks) is made visible again later, and goes
   back to the queue as a fresh message before its receive count runs out.

2. **Claim** (one conditional write that returns the context). The worker
   takes a lease on the node in the run's context item, unless the node has
   already completed this iteration (``DONE``: a redelivery — go to step 6
   to re-announce its successors, then acknowledge) or another worker holds a
   live lease (``LOCKED``: make the message visible again after a delay). The lease is
   renewed while the node runs, together with the message's visibility, so
   a long node is never picked up twice; a crashed worker's lease expires.
   The same write counts the attempt (``_flowcraft.attempts.<node>``, reset
   by the node's commit). Then the job is checked against the claimed
   context; a job that does not fit releases the claim — taking its attempt
   back — and is dropped with a log line, never harming the run:

   * the run's stored blueprint id differs from the job's (a run started by
     a client that stores none adopts the blueprint of its first committed
     job);
   * the node is not in the blueprint;
   * the iteration is ahead of the node (jobs are sent at the node's current
     generation, which only grows), or the node is outside every cycle and
     has resolved already, unless a loop revives it from a skip (``revivable``).

   A stored ``blueprintVersion`` that differs from this worker's blueprint
   releases the claim (not counted) and leaves the message for a matching
   worker. A node claimed more than ``max_receive_count`` times without
   finishing — crashed or killed workers; receives by pollers that died
   before claiming do not count — is a poison job: it fails as in step 8
   and its message is dead-lettered. A graceful stop's release does not count.

3. **Run** the node with the shared executor (retries, timeout, fallback).
   The node works on the claimed snapshot; its writes are recorded, not sent.
   A node at iteration ``max_node_iterations`` fails instead of running, with
   the in-memory runtime's message: a cycle without an exit ends.

4. **Route before writing.** The routing decision (which edges were taken)
   is computed now, from the snapshot plus the node's writes, and stored in
   the node's record. A redelivered job therefore never re-evaluates a
   condition against a context that changed meanwhile. What can fail once
   the node has run — a condition or transform that cannot be evaluated, an
   output or context write that cannot be stored (checked with
   ``check_storable`` before writing) — fails the node once, as in step 8,
   with the reason: a rerun would only repeat it.

5. **Commit** (one conditional write that returns the context): output,
   context writes, routing record (naming the lease owner), and skip records
   for successors that can only be skipped — applied only if this worker
   still holds the lease. If the lease was lost (it expired and another
   worker took the node over), the write does nothing and this worker's
   result is discarded: a node's effect lands in the context exactly once.
   When no success comes back (an error after the write applied, or an SDK
   retry that then fails the condition), the item is read: if the node's
   record names this lease owner, the commit landed and the job carries on
   as if it had returned. The same write may take the
   lease of one successor this worker will run next (local continuation:
   a chain costs no queue round trip per node), counting its attempt.

6. **Advance.** From the context the commit returned, decide each
   successor's join with :mod:`flowcraft.core.routing` — the same code the
   in-memory runtime uses. All commits of a run hit one item, so of a join's
   predecessors exactly the last to commit sees them all and starts the
   join; redelivered jobs repeat this step with the fresh context and find
   successors already done or leased. ``any`` joins take their first
   arrival through the coordination store (``set_if_not_exist``). Joins that
   can no longer run are skipped with one more write, and skipping
   propagates.

7. **Enqueue** the ready successors that are neither done nor leased, in one
   batch (durable ``sleep``: with a message delay). A crash between commit
   and enqueue loses messages; :meth:`reconcile` recomputes the frontier from
   the records and re-enqueues it.

8. **Finish.** When every terminal node is done or skipped and nothing
   else can run (no late predecessor of an ``any`` join is still pending),
   the status record is set ``completed`` with a write that only succeeds
   while it is ``running`` (declared once); with parked ``wait`` nodes it is
   set ``awaiting`` at that point instead. A parked node's entry in
   ``_awaitingNodeIds`` is written under a short lease on that list, so
   parallel parks and resumes never lose each other's update. A failed node
   writes a failure record (so
   nothing that needed it ever runs), poison / cancel markers for its
   ``all`` / ``any`` successors, and the status ``failed`` with the reason.
   Then the message is acknowledged.

Service calls for a node: claim + commit + one delete of its message (+ a
batched send, amortised over the successors) — and with local continuation,
a chain node costs one commit that also claims its successor.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from ..analysis import analyze_blueprint
from ..blueprint import WorkflowBlueprint
from ..context import (
    PatchOperation,
    TrackedContext,
    check_storable,
    public_view,
    validate_initial_context,
)
from ..core.engine import NodeEngine
from ..core.graph import DYNAMIC_PREFIX, Graph, dynamic_addition, graph_for, terminal_ids
from ..core.options import RuntimeOptions
from ..core.results import WorkflowResult, serialize_context
from ..core.routing import (
    AWAITING_DETAILS_KEY,
    AWAITING_IDS_KEY,
    INPUTS_PREFIX,
    completed_record,
    deliveries,
    failed_record,
    output_key,
    read_record,
    record_key,
    resolution_count,
    resolve_input,
    route,
    skipped_record,
)
from ..core.successors import JoinDecision, frontier
from ..core.successors import evaluate as evaluate_join
from ..errors import (
    BlueprintValidationError,
    ContextTooLargeError,
    FlowcraftError,
    InvalidJobError,
    UnknownBlueprintError,
    UnstorableValueError,
)
from ..events import EventBus, FlowcraftEvent, safe_emit
from ..nodes.base import CancellationSignal, NodeContext, NodeResult
from ..observability import get_metrics, get_tracer, heartbeat, inject, log_context, service_call
from ..runtime.runtime import run_subflow
from ..runview import parse_time
from .context import (
    BLUEPRINT_KEY,
    RUN_STATE_KEY,
    VERSION_KEY,
    ClaimStatus,
    DistributedContext,
    attempts,
    attempts_key,
    claim_status,
    live_lease,
    lock_key,
)
from .coordination import CoordinationStore, cancel_key, poison_key
from .job import JobPayload, parse_job

logger = logging.getLogger("flowcraft.distributed")

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
RESTING_STATUSES = FINAL_STATUSES | {"awaiting"}
JobOutcome = Literal["processed", "duplicate", "deferred", "dropped", "requeued"]


@dataclass(slots=True)
class QueueMessage:
    """A received message, as the polling loop sees it."""

    body: str | bytes
    message_id: str
    receive_count: int = 1
    handle: Any = None
    sent_at: float | None = None
    """When the message was sent (epoch seconds), where the queue tells: for queue lag."""


@dataclass
class _Step:
    """One claimed node execution, possibly followed by a local continuation."""

    job: JobPayload
    data: dict[str, Any]
    owner: str
    """The lease owner of this execution (and of its local continuations)."""
    not_before: float | None = None


@dataclass
class _Advance:
    ready: list[tuple[str, int, float | None]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(value: Any) -> float | None:
    """``lastUpdated`` as epoch seconds: numbers (seconds or milliseconds) as they are,
    ISO-8601 strings parsed (what the TypeScript library's client writes)."""
    return parse_time(value)


class BaseDistributedAdapter(abc.ABC):
    """The distributed job algorithm over abstract queue and storage primitives.

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
        local_continuation: run a node's single next node in the same worker
            instead of a queue round trip (it is claimed in the same write).
        status_touch_seconds: at most one ``lastUpdated`` write per run and
            worker in this interval; the reconciler's threshold must exceed it.
        unknown_blueprint_grace_seconds: how long a job naming a blueprint no worker
            seen so far has is left for one that has it (a rolling deploy), counted
            from the first worker that saw it; then its run fails.
        hard_receive_limit: a message received more often than this is removed even
            if it never started an attempt (default ten times ``max_receive_count``):
            the last resort against garbage that no check recognises.
    """

    max_delay_seconds: float = 900.0
    """The longest delay the queue accepts on a message (longer sleeps are chained)."""

    receive_gather_seconds: float = 2.0
    """The longest a busy worker waits for more of its jobs to finish before it receives (so
    one receive fetches several messages); it waits at most half the recent mean job time,
    so a free slot idles for a fraction of a job at worst."""

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
    ) -> None:
        self.runtime_options = runtime_options
        self.engine = NodeEngine(runtime_options)
        self.coordination_store = coordination_store
        self.event_bus = event_bus if event_bus is not None else runtime_options.event_bus
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.max_receive_count = max_receive_count
        self.local_continuation = local_continuation
        self.status_touch_seconds = status_touch_seconds
        self.poll_wait_seconds = poll_wait_seconds
        self.batch_size = batch_size
        self.shutdown_timeout_seconds = shutdown_timeout_seconds
        self.unknown_blueprint_grace_seconds = unknown_blueprint_grace_seconds
        self.hard_receive_limit = (hard_receive_limit if hard_receive_limit is not None
                                   else 10 * max_receive_count)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._status_touched: dict[str, float] = {}
        self._active: set[asyncio.Task[None]] = set()
        self._poll_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._job_started: dict[asyncio.Task[None], float] = {}
        self._mean_job_seconds = 0.0

    # ==========================================================================================
    # Primitives a backend supplies
    # ==========================================================================================

    @abc.abstractmethod
    def create_context(self, run_id: str) -> DistributedContext:
        """The stored context of one run."""

    @abc.abstractmethod
    async def _send_jobs(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
        """Enqueue jobs (batched where the service allows); ``delay_seconds`` <= max_delay."""

    @abc.abstractmethod
    async def _receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        """Long-poll for up to ``max_messages`` messages, invisible for ``lease_seconds``."""

    @abc.abstractmethod
    async def _delete(self, messages: Sequence[QueueMessage]) -> None:
        """Acknowledge (remove) messages."""

    @abc.abstractmethod
    async def _set_visibility(self, message: QueueMessage, seconds: float) -> None:
        """Keep a message invisible for ``seconds`` more (0: visible again now)."""

    async def _dead_letter(self, message: QueueMessage, reason: str) -> None:
        """Move a poison message aside. The default removes it; backends with a DLQ override."""
        await self._delete([message])

    @abc.abstractmethod
    async def _write_status(self, run_id: str, fields: Mapping[str, Any], *,
                            only_if_running: bool) -> bool:
        """Create or update a status record; with ``only_if_running`` only while its status
        is ``running`` (or the record is absent). Returns whether it was written."""

    @abc.abstractmethod
    async def _read_status(self, run_id: str) -> dict[str, Any] | None:
        """The status record of a run, or ``None``."""

    @abc.abstractmethod
    def _scan_statuses(self, status: str) -> AsyncIterator[dict[str, Any]]:
        """Every status record with the given ``status``, across all pages."""

    # ==========================================================================================
    # Worker loop
    # ==========================================================================================

    async def start(self) -> None:
        """Start polling the queue in the background (returns at once)."""
        if self._poll_task is not None and not self._poll_task.done():
            return
        self._stopping.clear()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll())
        logger.info("worker %s polling (concurrency %d)", self.worker_id, self.concurrency)

    async def run_forever(self) -> None:
        await self.start()
        assert self._poll_task is not None
        await self._poll_task

    async def stop(self, timeout_seconds: float | None = None) -> None:
        """Stop polling; let running jobs finish for up to ``timeout_seconds``, then cancel
        them and release what they hold (their messages become visible again)."""
        self._stopping.set()
        if self._poll_task is not None:
            self._poll_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poll_task
        timeout = self.shutdown_timeout_seconds if timeout_seconds is None else timeout_seconds
        if self._active:
            _, pending = await asyncio.wait(set(self._active), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        logger.info("worker %s stopped", self.worker_id)

    async def _poll(self) -> None:
        while not self._stopping.is_set():
            free = await self._take_slots()
            try:
                messages = await self._receive(free, self.poll_wait_seconds)
            except asyncio.CancelledError:
                for _ in range(free):
                    self._slots.release()
                raise
            except Exception:
                logger.exception("worker %s: receiving failed; retrying in 1 s", self.worker_id)
                for _ in range(free):
                    self._slots.release()
                await asyncio.sleep(1.0)
                continue
            heartbeat()
            for _ in range(free - len(messages)):
                self._slots.release()
            for message in messages:
                task = asyncio.get_running_loop().create_task(self._process_message(message))
                self._active.add(task)
                self._job_started[task] = time.monotonic()
                task.add_done_callback(self._job_done)

    async def _take_slots(self) -> int:
        """Take one free job slot, then more up to ``batch_size``: those free now, and those
        that running jobs give back soon (see ``receive_gather_seconds``), so a busy worker asks
        the queue for several messages at once instead of one per finished job."""
        await self._slots.acquire()
        free = 1
        want = min(self.batch_size, self.concurrency)
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        try:
            while free < want:
                if not self._slots.locked():
                    await self._slots.acquire()
                    free += 1
                    continue
                if not self._active or self._stopping.is_set():
                    break  # nothing running will give a slot back
                if deadline is None:
                    deadline = loop.time() + min(self.receive_gather_seconds,
                                                 0.5 * self._mean_job_seconds)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._slots.acquire(), remaining)
                except TimeoutError:
                    break
                free += 1
        except asyncio.CancelledError:
            for _ in range(free):
                self._slots.release()
            raise
        return free

    def _job_done(self, task: asyncio.Task[None]) -> None:
        heartbeat()
        self._active.discard(task)
        started = self._job_started.pop(task, None)
        if started is not None:  # a moving mean of how long jobs take, for _take_slots
            self._mean_job_seconds += 0.2 * (time.monotonic() - started - self._mean_job_seconds)
        self._slots.release()

    async def _process_message(self, message: QueueMessage) -> None:
        heartbeat = asyncio.get_running_loop().create_task(self._keep_invisible(message))
        outcome: JobOutcome = "deferred"
        delay = 0.0
        try:
            outcome, delay = await self._handle_message(message)
        except asyncio.CancelledError:
            outcome, delay = "deferred", 0.0
            raise
        except Exception:
            logger.exception("message %s: unexpected error; it will be redelivered",
                             message.message_id)
            outcome, delay = "deferred", min(30.0, self.lease_seconds)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(Exception):
                if outcome == "deferred":
                    await self._set_visibility(message, delay)
                else:
                    await self._delete([message])

    async def _keep_invisible(self, message: QueueMessage) -> None:
        interval = self._renew_interval()
        while True:
            await asyncio.sleep(interval)
            heartbeat()  # a worker busy with long nodes is alive
            try:
                await self._set_visibility(message, self.lease_seconds)
            except Exception as exc:
                logger.warning("message %s: could not extend visibility: %s",
                               message.message_id, exc)

    async def _handle_message(self, message: QueueMessage) -> tuple[JobOutcome, float]:
        get_metrics().message_received(
            None if message.sent_at is None else time.time() - message.sent_at,
            redelivered=message.receive_count > 1)
        try:
            job = parse_job(message.body)
        except InvalidJobError as exc:
            logger.error("message %s removed: %s", message.message_id, exc.message)
            await self._dead_letter(message, exc.message)
            await self._emit("job:failed", messageId=message.message_id, error=exc.message)
            if exc.run_id:
                await self._fail_run(exc.run_id, f"invalid job message: {exc.message}")
            return "dropped", 0.0
        if message.receive_count > self.hard_receive_limit and not await self._finished(job):
            # Attempts are counted in the run's item (step 2); this ceiling only catches a
            # message that keeps coming back without ever reaching a claim.
            reason = (f"job for node '{job.node_id}' was received {message.receive_count} times "
                      f"(hard limit {self.hard_receive_limit}); removed as a poison message")
            logger.error("run %s node %s: message %s %s", job.run_id, job.node_id,
                         message.message_id, reason)
            await self._dead_letter(message, reason)
            await self._fail_run(job.run_id, reason, node_id=job.node_id)
            return "dropped", 0.0
        outcome, delay = await self._handle(job, message_id=message.message_id, message=message)
        if outcome == "deferred" and message.receive_count >= self.max_receive_count:
            # Waiting is not failing: before its receive count (what makes a message poison,
            # here and in a queue's redrive policy) runs out, a job that only waited goes
            # back as a fresh message.
            await self._send_jobs([job], min(delay, self.max_delay_seconds))
            return "requeued", 0.0
        return outcome, delay

    async def _finished(self, job: JobPayload) -> bool:
        """Whether the job's node already completed this iteration: a copy of a finished job
        (whose holders died before acknowledging it) is a duplicate, not a poison message,
        however often it was received; it must not fail the run."""
        data = await self.create_context(job.run_id).load()
        return data is not None and claim_status(
            data, job.node_id, job.iteration, "", time.time()) is ClaimStatus.DONE

    # ==========================================================================================
    # The job algorithm
    # ==========================================================================================

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
        payload = job if isinstance(job, JobPayload) else parse_job(job)  # type: ignore[arg-type]
        outcome, delay = await self._handle(payload, message_id=None)
        if outcome == "deferred" and requeue_deferred:
            await self._send_jobs([payload], min(delay, self.max_delay_seconds))
            return "requeued"
        return outcome

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
        outcome, delay = await self._handle_message(message)
        if outcome == "deferred" and requeue_deferred:
            await self._send_jobs([parse_job(message.body)], min(delay, self.max_delay_seconds))
            return "requeued", 0.0
        return outcome, delay

    async def _handle(self, job: JobPayload, *, message_id: str | None,
                      message: QueueMessage | None = None) -> tuple[JobOutcome, float]:
        with self._observed(job, message.receive_count if message else job.attempt) as span:
            outcome, delay = await self._handle_job(job, message_id=message_id,
                                                    message=message)
            if outcome != "processed":  # a node that ran has its own outcome (completed, ...)
                span.set_outcome(outcome)
            return outcome, delay

    @contextlib.contextmanager
    def _observed(self, job: JobPayload, attempt: int | None) -> Any:
        """Log lines and the trace span of one node execution."""
        with log_context(run_id=job.run_id, node_id=job.node_id, attempt=attempt,
                         worker_id=self.worker_id), get_tracer().span_for_node(
                job.run_id, job.blueprint_id, job.node_id, attempt, self.worker_id,
                parent=job.trace) as span:
            yield span

    async def _handle_job(self, job: JobPayload, *, message_id: str | None,
                          message: QueueMessage | None = None) -> tuple[JobOutcome, float]:
        try:
            blueprint = self.engine.blueprint(job.blueprint_id)
            base_graph = self.engine.graph(blueprint)
        except UnknownBlueprintError as exc:
            return await self._unknown_blueprint(job, exc.message, message_id, message)
        except FlowcraftError as exc:
            return await self._remove(job, message_id, message, exc.message)
        context = self.create_context(job.run_id)
        await self._checkpoint("before_claim", job)
        owner = self._lease_owner()
        with service_call("claim"):
            claim = await context.claim(job.node_id, job.iteration, owner, self.lease_seconds)
        if claim.status is ClaimStatus.MISSING:
            return await self._remove(
                job, message_id, message,
                f"no context is stored for run '{job.run_id}'; was it started?")
        assert claim.data is not None
        if claim.status is ClaimStatus.LOCKED:
            if job.node_id in (claim.data.get(AWAITING_IDS_KEY) or ()):
                return "duplicate", 0.0  # parked; resume_with_action holds it briefly
            wait = max(1.0, (claim.expires or time.time()) - time.time())
            logger.info("run %s node %s: running on %s; retrying in %.0fs", job.run_id,
                        job.node_id, claim.holder, wait)
            return "deferred", wait
        if claim.status is ClaimStatus.DONE:
            logger.info("run %s node %s: already done (duplicate delivery); re-announcing "
                        "its successors", job.run_id, job.node_id)
            graph = graph_for(base_graph, claim.data)
            await self._advance_and_enqueue(context, graph, blueprint, [job.node_id], claim.data)
            return "duplicate", 0.0
        data = claim.data
        run_state = data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            await self._release_unattempted(context, job.node_id, owner, data)
            logger.info("run %s node %s: run is %s; job dropped", job.run_id, job.node_id,
                        run_state.get("status"))
            return "dropped", 0.0
        stored_blueprint = data.get(BLUEPRINT_KEY)
        if stored_blueprint is not None and stored_blueprint != job.blueprint_id:
            await self._release_unattempted(context, job.node_id, owner, data)
            logger.error("run %s node %s: message %s names blueprint '%s' but the run belongs "
                         "to blueprint '%s'; job dropped", job.run_id, job.node_id, message_id,
                         job.blueprint_id, stored_blueprint)
            return "dropped", 0.0
        stored_version = data.get(VERSION_KEY)
        if stored_version is not None and blueprint.version is not None and str(
            stored_version
        ) != str(blueprint.version):
            await self._release_unattempted(context, job.node_id, owner, data)
            logger.error(
                "run %s node %s: run was started with version %s of blueprint '%s' but this "
                "worker has version %s; leaving the job for a matching worker",
                job.run_id, job.node_id, stored_version, blueprint.id, blueprint.version,
            )
            return "deferred", min(60.0, self.max_delay_seconds)
        graph = graph_for(base_graph, data)
        misfit = job_misfit(graph, data, job)
        if misfit is not None:
            await self._release_unattempted(context, job.node_id, owner, data)
            logger.error("run %s node %s: message %s does not fit the run (%s); job dropped",
                         job.run_id, job.node_id, message_id, misfit)
            return "dropped", 0.0
        if job.node_id in (data.get(AWAITING_IDS_KEY) or ()):
            # Parked already (a duplicate): it waits for resume_with_action, not for a rerun.
            await self._release_unattempted(context, job.node_id, owner, data)
            logger.info("run %s node %s: awaiting; duplicate job dropped", job.run_id,
                        job.node_id)
            return "duplicate", 0.0
        wake_up_at = _wake_up_at(graph, data, job.node_id)
        if wake_up_at is not None and wake_up_at > time.time() + 0.5:
            # A durable sleep longer than the queue's longest delay: wait another round.
            await self._release_unattempted(context, job.node_id, owner, data)
            await self._send_jobs([job], min(self.max_delay_seconds, wake_up_at - time.time()))
            return "requeued", 0.0
        started = attempts(data, job.node_id)
        if started > self.max_receive_count:
            reason = (f"it was attempted {started} times without finishing (limit "
                      f"{self.max_receive_count}); removed as a poison message")
            logger.error("run %s node %s: message %s %s", job.run_id, job.node_id, message_id,
                         reason)
            if message is not None:
                await self._dead_letter(message, f"node '{job.node_id}' failed: {reason}")
            await self._fail_node(context, graph, job, owner, [], reason, {
                "nodeId": job.node_id, "message": reason, "attempt": started,
                "errorType": "PoisonMessage", "runId": job.run_id})
            return "dropped", 0.0
        step: _Step | None = _Step(job, data, owner)
        while step is not None:
            with (contextlib.nullcontext() if step.job is job
                  else self._observed(step.job, None)):  # a local continuation
                step = await self._execute_claimed(context, base_graph, blueprint, step)
        return "processed", 0.0

    async def _execute_claimed(self, context: DistributedContext, base_graph: Graph,
                               blueprint: WorkflowBlueprint, step: _Step) -> _Step | None:
        job, data, owner = step.job, step.data, step.owner
        run_state = data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            # A chain continued in this worker sees a cancel or failure only in the context
            # its last commit returned: stop here as a queued job would.
            await context.release(job.node_id, owner)
            logger.info("run %s node %s: run is %s; not continuing", job.run_id, job.node_id,
                        run_state.get("status"))
            return None
        graph = graph_for(base_graph, data)
        node = graph.nodes[job.node_id]  # checked by job_misfit, or a successor we routed to
        limit = self.runtime_options.max_node_iterations
        if job.iteration >= limit:
            # The in-memory runtime's limit and message: a cycle without an exit ends here.
            message = (f"node ran {job.iteration} times, the limit of max_node_iterations; "
                       "a loop without a reachable exit?")
            await self._fail_node(context, graph, job, owner, [], message, {
                "nodeId": job.node_id, "message": message, "attempt": 0,
                "errorType": "FlowcraftError", "runId": job.run_id})
            return None
        first_arrival = None
        if node.join_strategy == "any" and len(graph.forward_predecessors.get(node.id, ())) > 1:
            first_arrival = await self.coordination_store.get(
                _any_key(job.run_id, node.id, job.iteration))
        resolved = resolve_input(graph, node, data, first_arrival)
        tracked = TrackedContext(data)
        if resolved.store:
            tracked.set_now(INPUTS_PREFIX + node.id, resolved.value)
        services = _WorkerServices(self)
        await self._emit("node:start", runId=job.run_id, nodeId=node.id, input=resolved.value)
        cancelled = CancellationSignal()  # set by the renewal when the run is cancelled
        renewer = asyncio.get_running_loop().create_task(
            self._renew_lease(context, node.id, owner, cancelled))
        try:
            await self._checkpoint("before_run", job)
            started = time.perf_counter()
            outcome = await self.engine.run_node(
                graph, node, tracked, resolved.value, run_id=job.run_id,
                iteration=job.iteration, services=services, signal=cancelled,
            )
        except BaseException as exc:
            renewer.cancel()
            # A stop or kill of this worker is not the node's failure: it does not count.
            left = (attempts(data, node.id) - 1 if isinstance(exc, asyncio.CancelledError)
                    else None)
            with contextlib.suppress(Exception):
                await asyncio.shield(context.release(node.id, owner, attempts=left))
            raise
        # Keep renewing the lease until the commit is done: the writes between the node's
        # end and its commit (status touch, commit) can be slow, and a lapsed lease lets a
        # duplicate job run the node again while this worker is alive and about to commit.
        node_outcome = ("awaiting" if outcome.awaiting is not None
                        else "failed" if outcome.error is not None else "completed")
        get_metrics().node_finished(node_outcome, time.perf_counter() - started)
        get_tracer().annotate(outcome=node_outcome,
                              error=outcome.error.message if outcome.error else None)
        try:
            await self._checkpoint("after_run", job)
            if cancelled.is_set() and outcome.error is not None:
                # Stopped by its run's cancellation: not a failure of the node.
                await context.release(node.id, owner)
                return None
            await self._touch_status(job.run_id, job.blueprint_id)
            operations = list(tracked.deltas)
            if outcome.awaiting is not None:
                await self._park(context, graph, job, owner, operations, outcome.awaiting)
                return None
            if outcome.error is not None:
                await self._fail_node(context, graph, job, owner, operations,
                                      outcome.error.message, outcome.error.to_dict())
                return None
            assert outcome.result is not None
            return await self._commit_success(context, graph, blueprint, job, owner, tracked,
                                              operations, outcome.result, services.wake_up_at)
        finally:
            renewer.cancel()

    async def _commit_success(
        self, context: DistributedContext, graph: Graph, blueprint: WorkflowBlueprint,
        job: JobPayload, owner: str, tracked: TrackedContext,
        operations: list[PatchOperation], result: NodeResult, wake_up_at: float | None, *,
        continue_locally: bool = True,
    ) -> _Step | None:
        node_id = job.node_id
        working = tracked.data
        try:
            # The node has run: what can still go wrong is its result, which a rerun would
            # repeat, so it fails the node once (not a crash that retries until poison).
            _check_storable(operations, node_id)
            check_storable(result.output, f"output of node '{node_id}'")
        except UnstorableValueError as exc:
            await self._fail_node(context, graph, job, owner, [], exc.message,
                                  _error(job, exc))
            return None
        try:
            if result.dynamic_nodes:
                addition = dynamic_addition(graph, node_id, result.dynamic_nodes)
                operations.append(PatchOperation("set", DYNAMIC_PREFIX + node_id, addition))
                working[DYNAMIC_PREFIX + node_id] = addition
                graph = graph.extended([addition])
            operations.append(PatchOperation("set", output_key(node_id), result.output))
            working[output_key(node_id)] = result.output
            taken = route(graph, node_id, result.output, result.action, working)
        except Exception as exc:
            logger.warning("run %s node %s: its result could not be routed: %s", job.run_id,
                           node_id, exc)
            await self._fail_node(context, graph, job, owner, operations, str(exc),
                                  _error(job, exc))
            return None
        record = completed_record(job.iteration, taken, result.action)
        record["by"] = _owner_token(owner)  # tells our lost commit answer from another's
        record["t"] = round(time.time(), 6)  # commit order, for replay
        if wake_up_at is not None:
            record["wakeUpAt"] = wake_up_at
        if BLUEPRINT_KEY not in working:
            # A run started by a client that stores no blueprint id adopts its first job's.
            operations.append(PatchOperation("set", BLUEPRINT_KEY, job.blueprint_id))
            working[BLUEPRINT_KEY] = job.blueprint_id
        operations.append(PatchOperation("set", record_key(node_id), record))
        working[record_key(node_id)] = record
        # Successors whose only way in is this node are decided now, in the same write.
        certain_skips = self._certain_skips(graph, node_id, working)
        for skipped in certain_skips:
            value = skipped_record(resolution_count(working, skipped))
            operations.append(PatchOperation("set", record_key(skipped), value))
            working[record_key(skipped)] = value
        continuation = None
        if self.local_continuation and continue_locally and wake_up_at is None:
            continuation = self._continuation(graph, node_id, working)
        claims = [continuation] if continuation else []
        if continuation is not None:
            # The claim in this commit counts the successor's attempt, as a claim does.
            succ = continuation[0]
            operations.append(PatchOperation(
                "set", attempts_key(succ), 1 if succ == node_id else attempts(working, succ) + 1))
        await self._checkpoint("before_commit", job)
        try:
            committed = await self._commit(context, job, owner, operations, claims)
        except (ContextTooLargeError, UnstorableValueError) as exc:
            # Running the node again would produce the same output: fail it now, clearly.
            await self._fail_node(context, graph, job, owner, [], exc.message, _error(job, exc))
            return None
        if committed is None:
            logger.warning("run %s node %s: lease lost before commit (the node ran elsewhere);"
                           " this result is discarded", job.run_id, node_id)
            get_metrics().claim_lost()
            get_tracer().annotate(outcome="lost")
            return None
        await self._emit("node:finish", runId=job.run_id, nodeId=node_id, output=result.output,
                         action=result.action)
        await self._checkpoint("after_commit", job)
        if _cancelled(committed):
            # Cancelled while the node ran: its result is kept, nothing after it runs.
            logger.info("run %s node %s: run cancelled; not advancing", job.run_id, node_id)
            if continuation is not None:
                await context.release(continuation[0], owner,
                                      attempts=attempts(committed, continuation[0]) - 1)
            return None
        advance = await self._advance(context, graph, blueprint, [node_id, *certain_skips],
                                      committed, continued=continuation)
        next_step = None
        ready = advance.ready
        if continuation is not None:
            ready = [r for r in ready if (r[0], r[1]) != continuation]
            next_step = _Step(JobPayload(job.run_id, job.blueprint_id, continuation[0],
                                         continuation[1], trace=inject()), advance.data, owner)
        await self._enqueue_ready(job.run_id, blueprint.id, ready)
        await self._checkpoint("after_enqueue", job)
        await self._emit("job:processed", runId=job.run_id, nodeId=node_id)
        return next_step

    def _certain_skips(self, graph: Graph, node_id: str, working: dict[str, Any]) -> list[str]:
        """Successors reachable only through nodes being skipped now: skip them in the commit."""
        skips: list[str] = []
        stack = [node_id]
        while stack:
            source = stack.pop()
            record = read_record(working, source)
            if record is None:
                continue
            edges = graph.outgoing[source]
            delivered = set() if record.skipped else {edges[i].target for i in record.taken}
            for target in dict.fromkeys(e.target for e in edges):
                if (target in delivered or graph.is_back_edge(source, target)
                        or graph.forward_predecessors.get(target) != (source,)
                        or read_record(working, target) is not None):
                    continue
                value = skipped_record(resolution_count(working, target))
                working[record_key(target)] = value  # provisional, for the recursion
                skips.append(target)
                stack.append(target)
        for skipped in skips:
            working.pop(record_key(skipped), None)
        return skips

    def _continuation(self, graph: Graph, node_id: str,
                      working: Mapping[str, Any]) -> tuple[str, int] | None:
        """The one successor certain to be ready after this commit, if any."""
        record = read_record(working, node_id)
        if record is None:
            return None
        edges = graph.outgoing[node_id]
        for index in record.taken:
            target = edges[index].target
            only_way_in = graph.is_back_edge(node_id, target) or (
                graph.forward_predecessors.get(target) == (node_id,)
            )
            if only_way_in and (
                read_record(working, target) is None or graph.same_cycle(target, target)
            ):
                return target, resolution_count(working, target)
        return None

    async def _advance(
        self, context: DistributedContext, graph: Graph, blueprint: WorkflowBlueprint,
        sources: Sequence[str], data: dict[str, Any], *,
        continued: tuple[str, int] | None = None,
    ) -> _Advance:
        """Decide every successor of ``sources`` from ``data`` (the context our write returned).

        Skips are written (one patch per round, whose returned context feeds the next
        round) and propagate. Returns the nodes to start and the freshest context.
        """
        run_id = context.run_id
        ready: dict[tuple[str, int], float | None] = {}
        frontier = list(dict.fromkeys(sources))
        now = time.time()
        while frontier:
            skips: list[str] = []
            for source in frontier:
                record = read_record(data, source)
                if record is None or record.failed:
                    continue
                edges = graph.outgoing.get(source, [])
                delivered = set() if record.skipped else {edges[i].target for i in record.taken}
                for target in dict.fromkeys(e.target for e in edges):
                    generation = resolution_count(data, target)
                    if graph.is_back_edge(source, target):
                        if target in delivered:
                            ready[(target, generation)] = record.wake_up_at
                        continue
                    target_record = read_record(data, target)
                    if target_record is not None and not graph.same_cycle(target, target) and not (
                        target_record.skipped and target in delivered
                    ):
                        continue  # already resolved (a skip is revived by a delivery, below)
                    decision = evaluate_join(graph, data, target)
                    if decision is JoinDecision.RUN:
                        if await self._wins_any_join(graph, run_id, source, target, generation,
                                                     target in delivered):
                            ready[(target, generation)] = record.wake_up_at
                    elif decision is JoinDecision.SKIP and target not in skips:
                        skips.append(target)
            if not skips:
                break
            operations = [
                PatchOperation("set", record_key(t), skipped_record(resolution_count(data, t)))
                for t in skips
            ]
            fresh = await context.apply(operations)
            data = fresh if fresh is not None else data
            for skipped in skips:
                logger.debug("run %s node %s: skipped", run_id, skipped)
                await self._emit("node:skipped", runId=run_id, nodeId=skipped)
            frontier = skips
        awaiting = set(data.get(AWAITING_IDS_KEY) or ())
        startable = [
            (node_id, generation, wake)
            for (node_id, generation), wake in ready.items()
            if (node_id, generation) == continued
            or (
                resolution_count(data, node_id) <= generation
                and not live_lease(data, node_id, now)
                and node_id not in awaiting
            )
        ]
        await self._maybe_complete(run_id, graph, data)
        return _Advance(startable, data)

    async def _wins_any_join(self, graph: Graph, run_id: str, source: str, target: str,
                             generation: int, delivered: bool) -> bool:
        node = graph.nodes[target]
        if node.join_strategy != "any" or len(graph.forward_predecessors.get(target, ())) <= 1:
            return True
        key = _any_key(run_id, target, generation)
        if not delivered:
            # Decided by another predecessor's arrival; it holds the first-arrival key.
            return await self.coordination_store.get(key) is None
        if await self.coordination_store.set_if_not_exist(key, source, _COORDINATION_TTL):
            return True
        return await self.coordination_store.get(key) == source

    async def _advance_and_enqueue(self, context: DistributedContext, graph: Graph,
                                   blueprint: WorkflowBlueprint, sources: Sequence[str],
                                   data: dict[str, Any]) -> list[str]:
        advance = await self._advance(context, graph, blueprint, sources, data)
        await self._enqueue_ready(context.run_id, blueprint.id, advance.ready)
        return [node_id for node_id, _, _ in advance.ready]

    async def _enqueue_ready(self, run_id: str, blueprint_id: str,
                             ready: Iterable[tuple[str, int, float | None]]) -> None:
        now_jobs: list[JobPayload] = []
        delayed: dict[float, list[JobPayload]] = {}
        now = time.time()
        trace = inject()  # the enqueuing node's span: the parent of the successors' spans
        for node_id, generation, wake_up_at in ready:
            job = JobPayload(run_id, blueprint_id, node_id, generation, trace=trace)
            if wake_up_at is not None and wake_up_at > now + 0.5:
                delay = min(self.max_delay_seconds, wake_up_at - now)
                delayed.setdefault(round(delay, 1), []).append(job)
            else:
                now_jobs.append(job)
        if now_jobs:
            with service_call("enqueue"):
                await self._send_jobs(now_jobs, 0)
        for delay, jobs in delayed.items():
            with service_call("enqueue"):
                await self._send_jobs(jobs, delay)
        for job in [*now_jobs, *(j for jobs in delayed.values() for j in jobs)]:
            await self._emit("job:enqueued", runId=run_id, nodeId=job.node_id)

    async def _maybe_complete(self, run_id: str, graph: Graph, data: Mapping[str, Any]) -> None:
        """Declare the run ``completed`` (or ``awaiting``) once nothing else can run in it."""
        run_state = data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in ("failed", "cancelled"):
            return
        awaiting = list(data.get(AWAITING_IDS_KEY) or [])
        if not awaiting:
            for terminal in terminal_ids(graph):
                record = read_record(data, terminal)
                if record is None or record.failed:
                    return
        pending = frontier(graph, data)
        if pending.ready or pending.skip:
            # Something can still run (or is running), e.g. a late predecessor of an ``any``
            # join whose terminal already finished, or a branch beside a waiting node: the
            # run rests when it has finished, as in memory.
            return
        if awaiting:
            await self._write_status(run_id, {"status": "awaiting", "lastUpdated": now_iso(),
                                              "awaitingNodeIds": awaiting},
                                     only_if_running=True)
            return
        if await self._write_status(run_id, {"status": "completed", "finalStatus": "completed",
                                             "lastUpdated": now_iso()}, only_if_running=True):
            logger.info("run %s completed", run_id)
            get_metrics().run_finished("completed")
            await self._emit("workflow:finish", runId=run_id, status="completed")

    async def _park(self, context: DistributedContext, graph: Graph, job: JobPayload,
                    owner: str, operations: list[PatchOperation],
                    details: dict[str, Any]) -> None:
        # The awaiting node keeps no record: resume_with_action completes it.
        snapshot = await self._lock_awaiting(context, owner)
        if snapshot is None:
            return None
        ids = list(snapshot.get(AWAITING_IDS_KEY) or [])
        if job.node_id not in ids:
            ids.append(job.node_id)
        all_details = dict(snapshot.get(AWAITING_DETAILS_KEY) or {})
        all_details[job.node_id] = {**details, "iteration": job.iteration}
        operations += [PatchOperation("set", AWAITING_IDS_KEY, ids),
                       PatchOperation("set", AWAITING_DETAILS_KEY, all_details),
                       PatchOperation("delete", lock_key(_AWAITING_LOCK))]
        committed = await context.commit(job.node_id, job.iteration, owner, operations)
        if committed is None:
            await context.release(_AWAITING_LOCK, owner)
            return None
        logger.info("run %s node %s: awaiting (%s)", job.run_id, job.node_id,
                    details.get("reason"))
        await self._maybe_complete(job.run_id, graph, committed)
        return None

    async def _lock_awaiting(self, context: DistributedContext,
                             owner: str) -> dict[str, Any] | None:
        """Take the lease that serialises changes of ``_awaitingNodeIds`` (parks and resumes
        of different nodes write that one list); return the context as it is now, or
        ``None`` if the run has no context. The caller's commit deletes the lease."""
        while True:
            claim = await context.claim(_AWAITING_LOCK, 0, owner, self.lease_seconds,
                                        count_attempt=False)
            if claim.status is ClaimStatus.CLAIMED:
                return claim.data
            if claim.status is ClaimStatus.MISSING:
                return None
            await asyncio.sleep(0.01 + (uuid.uuid4().int % 40) / 1000)

    async def _fail_node(self, context: DistributedContext, graph: Graph, job: JobPayload,
                         owner: str, operations: list[PatchOperation], message: str,
                         error: dict[str, Any]) -> None:
        reason = f"node '{job.node_id}' failed: {message}"
        record = {**failed_record(job.iteration, message, error), "by": _owner_token(owner),
                  "t": round(time.time(), 6)}
        failure = [
            PatchOperation("set", record_key(job.node_id), record),
            PatchOperation("set", RUN_STATE_KEY, {"status": "failed", "reason": reason,
                                                  "error": error}),
        ]
        try:
            _check_storable(operations, job.node_id)
            committed = await self._commit(context, job, owner, [*operations, *failure])
        except (ContextTooLargeError, UnstorableValueError):
            # The node's own writes cannot be stored: record the failure without them.
            committed = await self._commit(context, job, owner, failure)
        if committed is None:
            return
        logger.error("run %s node %s failed: %s", job.run_id, job.node_id, message)
        await self._emit("node:error", runId=job.run_id, nodeId=job.node_id, error=error)
        for target in graph.forward_successors(job.node_id):
            strategy = graph.nodes[target].join_strategy
            key = cancel_key(job.run_id, target) if strategy == "any" else poison_key(
                job.run_id, target)
            await self.coordination_store.set_if_not_exist(key, job.node_id, _COORDINATION_TTL)
        await self._fail_run(job.run_id, reason, node_id=job.node_id, error=error)

    async def _commit(self, context: DistributedContext, job: JobPayload, owner: str,
                      operations: Sequence[PatchOperation],
                      claims: Sequence[tuple[str, int]] = ()) -> dict[str, Any] | None:
        """Commit, and when no success came back read the item: a write whose answer was
        lost (an error after it applied; a retry that then failed its condition) shows our
        own record, and counts as committed. ``None``: the lease was lost."""
        failure: Exception | None = None
        try:
            with service_call("commit"):
                committed = await context.commit(job.node_id, job.iteration, owner, operations,
                                                 claims, self.lease_seconds)
        except (ContextTooLargeError, UnstorableValueError):
            raise
        except Exception as exc:
            failure, committed = exc, None
        if committed is not None:
            return committed
        data = await context.load()
        record = (data or {}).get(record_key(job.node_id))
        if (isinstance(record, Mapping) and record.get("by") == _owner_token(owner)
                and record.get("n") == job.iteration + 1):
            logger.warning("run %s node %s: the commit's answer was lost (%s) but the write "
                           "landed; continuing", job.run_id, job.node_id,
                           failure or "condition failed on a retry")
            return data
        if failure is not None:
            raise failure
        return None

    async def _release_unattempted(self, context: DistributedContext, node_id: str,
                                   owner: str, data: Mapping[str, Any]) -> None:
        """Release a claim that did not run the node: its attempt does not count."""
        await context.release(node_id, owner, attempts=attempts(data, node_id) - 1)

    async def _unknown_blueprint(self, job: JobPayload, reason: str, message_id: str | None,
                                 message: QueueMessage | None) -> tuple[JobOutcome, float]:
        """A job naming a blueprint this worker lacks: during a rolling deploy another worker
        has it. Leave the job for that worker for ``unknown_blueprint_grace_seconds`` from the
        first sighting (kept in the coordination store, shared by all workers); then fail."""
        data = await self.create_context(job.run_id).load()
        run_state = (data or {}).get(RUN_STATE_KEY)
        stored = (data or {}).get(BLUEPRINT_KEY)
        drop = None
        if data is None:
            drop = f"{reason}, and no run '{job.run_id}' is stored"
        elif stored is not None and stored != job.blueprint_id:
            drop = f"{reason}, and the run belongs to blueprint '{stored}'"
        elif isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            drop = f"{reason}, and the run is {run_state.get('status')}"
        if drop is not None:
            return await self._remove(job, message_id, message, drop, fail_run=False)
        now = time.time()
        key = f"flowcraft:unknown-blueprint:{job.run_id}:{job.blueprint_id}"
        await self.coordination_store.set_if_not_exist(key, repr(now), _COORDINATION_TTL)
        first_seen = parse_timestamp(await self.coordination_store.get(key)) or now
        waited = now - first_seen
        grace = self.unknown_blueprint_grace_seconds
        if waited < grace:
            logger.warning("run %s node %s: %s on this worker; leaving the job for a worker "
                           "that has it (waited %.0fs of %.0fs)", job.run_id, job.node_id,
                           reason, waited, grace)
            return "deferred", max(1.0, min(grace - waited, 60.0, self.max_delay_seconds))
        return await self._remove(
            job, message_id, message,
            f"{reason}; no worker that has it took the job within {grace:g}s")

    async def _remove(self, job: JobPayload, message_id: str | None,
                      message: QueueMessage | None, reason: str, *,
                      fail_run: bool = True) -> tuple[JobOutcome, float]:
        """Remove a job that can never run (dead-lettered where possible), logged with its
        message id; the run, unless ``fail_run`` is false, is marked failed with the reason."""
        logger.error("run %s node %s: message %s removed: %s", job.run_id, job.node_id,
                     message_id, reason)
        if message is not None:
            await self._dead_letter(message, reason)
        if fail_run:
            await self._fail_run(job.run_id, reason, node_id=job.node_id)
        return "dropped", 0.0

    async def _fail_run(self, run_id: str, reason: str, *, node_id: str | None = None,
                        error: Mapping[str, Any] | None = None) -> None:
        fields: dict[str, Any] = {"status": "failed", "finalStatus": "failed",
                                  "lastUpdated": now_iso(), "error": reason}
        if node_id:
            fields["failedNodeId"] = node_id
        if error:
            # Type, message and the end of the traceback (at most 4 KB), for status readers.
            fields["failure"] = {key: error[key] for key in
                                 ("nodeId", "errorType", "message", "attempt", "traceback")
                                 if error.get(key) is not None}
        try:
            if await self._read_status(run_id) is None:
                # No such run (a garbage message naming a run id): create no record for it.
                logger.error("run %s: not failed, no such run is recorded (%s)", run_id, reason)
                return
            written = await self._write_status(run_id, fields, only_if_running=True)
        except Exception:
            logger.exception("run %s: could not record the failure", run_id)
            return
        if written:
            get_metrics().run_finished("failed")
            await self._emit("workflow:finish", runId=run_id, status="failed", error=reason)
            await self._emit("job:failed", runId=run_id, nodeId=node_id, error=reason)

    async def _renew_lease(self, context: DistributedContext, node_id: str, owner: str,
                           cancelled: CancellationSignal | None = None) -> None:
        interval = self._renew_interval()
        while True:
            await asyncio.sleep(interval)
            try:
                # Renew first: a slow read must never delay the lease past its expiry.
                if not await context.renew(node_id, owner, self.lease_seconds):
                    # Committed meanwhile (the commit removes the lease), or taken over: the
                    # commit, conditioned on the lease, tells which and logs a takeover.
                    logger.debug("run %s node %s: lease no longer held", context.run_id,
                                 node_id)
                    return
                if cancelled is not None and not cancelled.is_set() and _cancelled(
                        await context.load() or {}):
                    # The run was cancelled: the node sees ctx.signal (one read per renewal).
                    logger.info("run %s node %s: run cancelled; signalling the node",
                                context.run_id, node_id)
                    cancelled.set()
            except Exception as exc:
                logger.warning("run %s node %s: lease renewal failed: %s", context.run_id,
                               node_id, exc)

    async def _touch_status(self, run_id: str, blueprint_id: str | None = None) -> None:
        """Record progress (``lastUpdated``) at most every ``status_touch_seconds``; also the
        blueprint id, which status records written by other clients may lack."""
        now = time.monotonic()
        last = self._status_touched.get(run_id)
        if last is not None and now - last < self.status_touch_seconds:
            return
        if len(self._status_touched) > 10_000:
            self._status_touched.clear()
        self._status_touched[run_id] = now
        with contextlib.suppress(Exception):
            fields = {"lastUpdated": now_iso(),
                      **({"blueprintId": blueprint_id} if blueprint_id else {})}
            await self._write_status(run_id, fields, only_if_running=True)

    def _renew_interval(self) -> float:
        """How often leases and message visibility are extended: three times per lease, so
        one late renewal never lets a running node's lease or message lapse."""
        return max(0.05, self.lease_seconds / 3)

    def _lease_owner(self) -> str:
        """A lease owner for one job execution: the worker id plus a token, so two
        deliveries of one job on the same worker never both hold the node's lease."""
        return f"{self.worker_id}/{uuid.uuid4().hex[:8]}"

    async def _checkpoint(self, step: str, job: JobPayload) -> None:
        """A named point of the job algorithm; tests override it to inject crashes."""

    async def _emit(self, event_type: str, **payload: Any) -> None:
        if self.event_bus is not None:
            await safe_emit(self.event_bus, FlowcraftEvent(event_type, payload))

    # ==========================================================================================
    # Client side, reconcile, resume
    # ==========================================================================================

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
        bp = blueprint if isinstance(blueprint, WorkflowBlueprint) else self.engine.blueprint(
            blueprint)
        run_id = run_id or str(uuid.uuid4())
        initial = validate_initial_context(initial_context)
        if bp.version is not None:
            initial[VERSION_KEY] = bp.version
        initial[BLUEPRINT_KEY] = bp.id
        # A conditional create: a taken run id raises RunAlreadyExistsError here, before the
        # status record or any job is written, and the existing run is left untouched.
        await self.create_context(run_id).create(initial)
        started = now_iso()  # the run view's start time and duration
        await self._write_status(run_id, {"status": "running", "lastUpdated": started,
                                          "startedAt": started, "blueprintId": bp.id},
                                 only_if_running=False)
        starts = analyze_blueprint(bp).start_node_ids
        with get_tracer().run_span(run_id, bp.id):
            trace = inject()  # the start nodes' spans are children of the run's
            with service_call("enqueue"):
                await self._send_jobs([JobPayload(run_id, bp.id, node_id, trace=trace)
                                       for node_id in starts], 0)
        get_metrics().run_started()
        logger.info("run %s started (%s, start nodes %s)", run_id, bp.id, starts)
        return run_id

    async def get_run_status(self, run_id: str) -> dict[str, Any] | None:
        return await self._read_status(run_id)

    async def wait_for_result(self, run_id: str, timeout: float = 60.0,
                              poll_interval: float = 0.25) -> WorkflowResult:
        """Poll until the run rests (completed, failed, cancelled or awaiting)."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self._read_status(run_id)
            if status and status.get("status") in RESTING_STATUSES:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {timeout:g}s "
                                   f"(status: {status.get('status') if status else 'unknown'})")
            await asyncio.sleep(poll_interval)
        data = await self.create_context(run_id).load() or {}
        errors = []
        if status.get("error"):
            from ..core.executor import NodeError

            error = (data.get(RUN_STATE_KEY) or {}).get("error") or {}
            errors.append(NodeError(
                node_id=status.get("failedNodeId") or error.get("nodeId") or "",
                message=error.get("message") or status["error"],
                attempt=int(error.get("attempt") or 0),
                error_type=error.get("errorType") or "FlowcraftError", run_id=run_id,
                traceback=error.get("traceback"),
            ))
        return WorkflowResult(status=status["status"], context=public_view(data),
                              serialized_context=serialize_context(data), errors=errors,
                              run_id=run_id)

    async def reconcile(self, run_id: str) -> list[str]:
        """Re-enqueue the ready frontier of a run (nodes neither done nor leased); write
        skips that were lost; publish completion if it was missed. Returns the node ids
        enqueued."""
        status = await self._read_status(run_id)
        blueprint_id = (status or {}).get("blueprintId")
        context = self.create_context(run_id)
        data = await context.load()
        if data is None:
            raise FlowcraftError(f"cannot reconcile run '{run_id}': no stored context",
                                 run_id=run_id)
        if not blueprint_id:
            blueprint_id = data.get(BLUEPRINT_KEY) or self._infer_blueprint_id(data)
        blueprint = self.engine.blueprint(blueprint_id)
        graph = graph_for(self._routing_graph(blueprint), data)
        pending = frontier(graph, data)
        ready, skip = [r.node_id for r in pending.ready], pending.skip
        if skip:
            data = await context.apply([
                PatchOperation("set", record_key(t), skipped_record(resolution_count(data, t)))
                for t in skip
            ]) or data
            advance = await self._advance(context, graph, blueprint, skip, data)
            data = advance.data
            ready = list(dict.fromkeys([*ready, *(r[0] for r in advance.ready)]))
        now = time.time()
        jobs = []
        for node_id in ready:
            if live_lease(data, node_id, now):
                continue
            wake = max((read_record(data, e.source).wake_up_at or 0  # type: ignore[union-attr]
                        for e in graph.incoming.get(node_id, ())
                        if read_record(data, e.source) is not None), default=0) or None
            jobs.append((node_id, resolution_count(data, node_id), wake))
        await self._enqueue_ready(run_id, blueprint.id, jobs)
        await self._maybe_complete(run_id, graph, data)
        if jobs:
            logger.info("run %s reconciled: re-enqueued %s", run_id, [j[0] for j in jobs])
        return [j[0] for j in jobs]

    def _routing_graph(self, blueprint: WorkflowBlueprint) -> Graph:
        """The graph for routing alone (reconcile runs no node, so a reconciler need not
        have the nodes' implementations)."""
        try:
            return self.engine.graph(blueprint)
        except BlueprintValidationError:
            return Graph(blueprint)

    def _infer_blueprint_id(self, data: Mapping[str, Any]) -> str:
        known = list(self.runtime_options.blueprints)
        if len(known) == 1:
            return known[0]
        raise FlowcraftError("cannot tell the run's blueprint: its status record has no "
                             "blueprintId and this worker knows several blueprints")

    async def resume_with_action(self, run_id: str, action: str | None = None,
                                 output: Any = None, node_id: str | None = None,
                                 *, blueprint_id: str | None = None) -> list[str]:
        """Complete an awaiting node with ``output``; ``action`` routes from it. Returns the
        node ids enqueued."""
        context = self.create_context(run_id)
        data = await context.load()
        if data is None:
            raise FlowcraftError(f"cannot resume run '{run_id}': no stored context",
                                 run_id=run_id)
        awaiting = list(data.get(AWAITING_IDS_KEY) or [])
        target = node_id or (awaiting[0] if awaiting else None)
        if target is None or target not in awaiting:
            raise FlowcraftError(f"cannot resume run '{run_id}': node {target!r} is not "
                                 f"awaiting (awaiting: {awaiting})", run_id=run_id)
        status = await self._read_status(run_id) or {}
        blueprint = self.engine.blueprint(
            blueprint_id or status.get("blueprintId") or data.get(BLUEPRINT_KEY)
            or self._infer_blueprint_id(data))
        graph = graph_for(self._routing_graph(blueprint), data)  # a client has no registry
        iteration = int((data.get(AWAITING_DETAILS_KEY) or {}).get(target, {}).get(
            "iteration", resolution_count(data, target)))
        owner = self._lease_owner()
        if await self._lock_awaiting(context, owner) is None:
            raise FlowcraftError(f"cannot resume run '{run_id}': no stored context",
                                 run_id=run_id)
        try:
            claim = await context.claim(target, iteration, owner, self.lease_seconds)
            if claim.status is not ClaimStatus.CLAIMED or claim.data is None:
                raise FlowcraftError(f"cannot resume node '{target}' of run '{run_id}': "
                                     f"{claim.status.value}", run_id=run_id, node_id=target)
            data = claim.data
            ids = [i for i in (data.get(AWAITING_IDS_KEY) or []) if i != target]
            details = {k: v for k, v in (data.get(AWAITING_DETAILS_KEY) or {}).items()
                       if k != target}
            tracked = TrackedContext(data)
            if ids:
                tracked.set_now(AWAITING_IDS_KEY, ids)
                tracked.set_now(AWAITING_DETAILS_KEY, details)
            else:
                tracked.delete_now(AWAITING_IDS_KEY)
                tracked.delete_now(AWAITING_DETAILS_KEY)
            tracked.delete_now(lock_key(_AWAITING_LOCK))  # released by the same commit
            await self._write_status(run_id, {"status": "running", "lastUpdated": now_iso()},
                                     only_if_running=False)
            job = JobPayload(run_id, blueprint.id, target, iteration)
            step = await self._commit_success(
                context, graph, blueprint, job, owner, tracked, list(tracked.deltas),
                NodeResult(output=output, action=action), None, continue_locally=False,
            )
            assert step is None
        finally:
            await context.release(_AWAITING_LOCK, owner)  # a no-op once committed
        logger.info("run %s node %s resumed with action %r", run_id, target, action)
        return [target]


_COORDINATION_TTL = 7 * 24 * 3600
_AWAITING_LOCK = "_flowcraft:awaiting"
"""A pseudo node whose lease serialises changes of the run's awaiting list."""


def _cancelled(data: Mapping[str, Any]) -> bool:
    run_state = data.get(RUN_STATE_KEY)
    return isinstance(run_state, Mapping) and run_state.get("status") == "cancelled"


def _wake_up_at(graph: Graph, data: Mapping[str, Any], node_id: str) -> float | None:
    """When the durable sleeps that delivered to ``node_id`` end (``None``: no sleep)."""
    wakes = [record.wake_up_at for delivery in deliveries(graph, data, node_id)
             if (record := read_record(data, delivery.source)) is not None
             and record.wake_up_at is not None]
    return max(wakes) if wakes else None


def revivable(graph: Graph, data: Mapping[str, Any]) -> list[str]:
    """Skipped nodes outside loops that a predecessor now delivers to, and that can run.

    A loop skips a target outside it on the iterations that do not take the edge to it
    (a ``break`` target, while the loop continues); when a later iteration does take it,
    the target runs after all, as a new generation — as the in-memory runtime runs it —
    and so do the skipped nodes behind it. :func:`ready_frontier` counts every recorded
    node outside a loop as done, so completion and reconcile add these.
    """
    return [node_id for node_id in graph.nodes if _revivable(graph, data, node_id)]


def _revivable(graph: Graph, data: Mapping[str, Any], node_id: str) -> bool:
    record = read_record(data, node_id)
    return (record is not None and record.skipped and not graph.same_cycle(node_id, node_id)
            and bool(deliveries(graph, data, node_id))
            and evaluate_join(graph, data, node_id) is JoinDecision.RUN)


def job_misfit(graph: Graph, data: Mapping[str, Any], job: JobPayload) -> str | None:
    """Why a job cannot belong to the run as stored (``None``: it fits).

    Jobs are enqueued at the generation their node is at (:func:`resolution_count`),
    which only grows: a later one was never sent. A node outside every cycle resolves
    once, unless a loop revives it from a skip (:func:`revivable`): a job for it at its
    current generation after it resolved would run it a second time.
    """
    if job.node_id not in graph.nodes:
        return f"node '{job.node_id}' is not in blueprint '{graph.blueprint.id}'"
    count = resolution_count(data, job.node_id)
    if job.iteration > count:
        return (f"iteration {job.iteration} is ahead of the node, which has resolved "
                f"{count} time(s)")
    if (job.iteration == count and read_record(data, job.node_id) is not None
            and not graph.same_cycle(job.node_id, job.node_id)
            and not _revivable(graph, data, job.node_id)):
        return "the node has resolved already and is in no loop that could run it again"
    return None


def _check_storable(operations: Iterable[PatchOperation], node_id: str) -> None:
    for operation in operations:
        if operation.op == "set":
            check_storable(operation.value,
                           f"context key '{operation.key}' written by node '{node_id}'")


def _owner_token(owner: str) -> str:
    """The random part of a lease owner: unique per execution, and short in every record."""
    return owner.rsplit("/", 1)[-1]


def _error(job: JobPayload, exc: Exception) -> dict[str, Any]:
    """The failure record of a node that failed after it ran (its result is the problem)."""
    message = exc.message if isinstance(exc, FlowcraftError) else str(exc)
    return {"nodeId": job.node_id, "message": message, "attempt": 1,
            "errorType": type(exc).__name__, "runId": job.run_id}


def _any_key(run_id: str, node_id: str, iteration: int) -> str:
    return f"flowcraft:any:{run_id}:{node_id}:{iteration}"


class _WorkerServices:
    """``ctx.engine`` on a worker: durable sleep and in-process subflows."""

    def __init__(self, adapter: BaseDistributedAdapter) -> None:
        self._adapter = adapter
        self.wake_up_at: float | None = None

    async def sleep(self, ctx: NodeContext, seconds: float) -> None:
        if seconds <= 1.0:
            await asyncio.sleep(seconds)
            return
        # Durable: the node completes now; its successors are enqueued with a delay.
        self.wake_up_at = time.time() + seconds

    async def run_subflow(self, ctx: NodeContext, blueprint_id: str) -> Any:
        return await run_subflow(self._adapter.engine, ctx, blueprint_id)
