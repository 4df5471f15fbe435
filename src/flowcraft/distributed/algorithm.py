"""``JobAlgorithm``: the distributed job algorithm, written once for every queue and database.

It runs one job over a :class:`~flowcraft.distributed.backend.Backend` (the job
queue, the runs' stored contexts, the status records), the
:class:`~flowcraft.core.engine.NodeEngine` (which runs the node), the coordination
store and the worker's settings. The in-process backend
(:mod:`flowcraft.distributed.inprocess`), the AWS adapter and the Azure adapter
all run exactly this code; the polling loop (:mod:`.polling`) and the
serverless handlers hand it the messages, and the client side (:mod:`.runs`)
shares its commit path for ``resume_with_action`` (step 0, starting a run, is
there too). What follows a commit (steps 6 and 8's completion) is decided in
:mod:`.progress`; parks, failures and refused jobs (step 8, and the refusals of
step 1) are written by :mod:`.finish`. A ``batch-scatter`` over many items runs its map
as a ledger of chunk items (:mod:`.ledger`): chunk jobs carry ``chunk`` and go there.

Crash injection: at each named step (``before_claim``, ``before_run``,
``after_run``, ``before_commit``, ``after_commit``, ``after_enqueue``; a map ledger's
chunk jobs: ``chunk_before_commit``, ``chunk_after_commit``) the
algorithm awaits ``checkpoint(step, job)``, a no-op unless a test replaces it.

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
   already completed this iteration (``DONE``: a redelivery — go to step 6 to
   re-announce the successors of the nodes its execution committed, found by
   the owner their records name; wait while it holds a lease on one of them
   (a dead worker's), then acknowledge) or another worker holds a live lease
   (``LOCKED``: make the message visible again after a delay). The lease is
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
     has resolved already, unless a loop revives it from a skip.

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
   as if it had returned. The same write may take the leases of successors
   certain to run, counting their attempts: one this job runs next (local
   continuation: a chain costs no queue round trip per node), and one per
   job slot the polling loop lends it (:mod:`.slots`).

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
   and enqueue loses messages; ``reconcile`` (:mod:`.runs`) recomputes the
   frontier from the records and re-enqueues it.

8. **Finish.** When every terminal node is done or skipped and nothing
   else can run (no late predecessor of an ``any`` join is still pending),
   the status record is set ``completed`` with a write that only succeeds
   while it is ``running`` (declared once); with parked ``wait`` nodes it is
   set ``awaiting`` at that point instead. A parked node's entry in
   ``_awaitingNodeIds`` is written under a short lease on that list, so
   parallel parks and resumes never lose each other's update. A failed node
   writes a failure record (so nothing that needed it ever runs), poison /
   cancel markers for its ``all`` / ``any`` successors, and the status
   ``failed`` with the reason.
   Then the message is acknowledged.

Service calls for a node: claim + commit + one delete of its message (+ a
batched send, amortised over the successors); a node claimed by its
predecessor's commit costs its commit alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..blueprint import WorkflowBlueprint
from ..context import PatchOperation, TrackedContext, check_storable, deep_copy_json
from ..core.engine import NodeEngine
from ..core.graph import DYNAMIC_PREFIX, Graph, dynamic_addition, graph_for
from ..core.options import RuntimeOptions
from ..core.routing import (
    AWAITING_IDS_KEY,
    INPUTS_PREFIX,
    completed_record,
    output_key,
    record_key,
    resolution_count,
    resolve_input,
    route,
    skipped_record,
)
from ..errors import (
    ContextTooLargeError,
    FlowcraftError,
    InvalidJobError,
    UnknownBlueprintError,
    UnstorableValueError,
)
from ..events import EventBus, FlowcraftEvent, safe_emit
from ..nodes.base import CancellationSignal, NodeResult
from ..observability import get_metrics, get_tracer, inject, log_context, service_call
from . import progress as _progress
from .backend import FINAL_STATUSES, Backend, QueueMessage
from .claims import ClaimBatcher
from .context import (
    BLUEPRINT_KEY,
    RUN_STATE_KEY,
    ClaimStatus,
    DistributedContext,
    attempts,
    attempts_key,
    claim_status,
    keep_lease,
    owner_token,
)
from .coordination import CoordinationStore, FullCoordinationStore, any_key
from .finish import Finisher, check_operations, result_error
from .homes import arrive, mark_wide_fan, run_context
from .job import JobPayload, parse_job
from .ledger import MapLedger
from .options import WorkerSettings
from .progress import (
    Progress,
    arrivals,
    commit_plan,
    decided_alone,
    job_misfit,
    last_arrival,
    wake_up_at,
)
from .services import WorkerServices
from .slots import LocalSlots
from .snapshots import RunSnapshots

logger = logging.getLogger("flowcraft.distributed")

JobOutcome = Literal["processed", "duplicate", "deferred", "dropped", "requeued"]
Checkpoint = Callable[[str, JobPayload], Awaitable[None]]
"""``await checkpoint(step, job)`` at each named step of the algorithm."""

async def no_checkpoint(step: str, job: JobPayload) -> None:
    """The default checkpoint: nothing happens there."""


@dataclass
class _Step:
    """One claimed node execution, possibly followed by a local continuation."""

    job: JobPayload
    data: dict[str, Any]
    owner: str
    """The lease owner of this execution (and of its local continuations)."""
    slots: LocalSlots | None = None  # where claimed successors beyond the first run
    claimed_at: float | None = None  # when a commit took its lease (monotonic)


class JobAlgorithm:
    """Runs jobs (see the module docstring) for one worker.

    Args:
        backend: the queue, run store and status store.
        engine: runs nodes (registry, executor, middleware).
        coordination_store: shared by all workers (``any`` joins, failure markers).
        settings: the worker's options, shared with its polling loop.
        runtime_options: what the engine was built from (default: the engine's).
        event_bus: receives node and job events.
    """

    def __init__(self, backend: Backend, engine: NodeEngine,
                 coordination_store: CoordinationStore, settings: WorkerSettings, *,
                 runtime_options: RuntimeOptions | None = None,
                 event_bus: EventBus | None = None) -> None:
        self.backend = backend
        self.engine = engine
        self.runtime_options = runtime_options if runtime_options is not None else engine.options
        self.settings = settings
        self.event_bus = event_bus
        self.progress = Progress(backend, coordination_store, self.emit)
        self.finisher = Finisher(backend, self.progress, settings, self.emit)
        self.checkpoint: Checkpoint = no_checkpoint
        """Awaited at each named step; tests replace it to inject crashes."""
        self.ledger = MapLedger(self)
        self.snapshots = RunSnapshots()  # runs as this worker last committed to them
        self.claims = ClaimBatcher()  # claims from those copies, one write per run and turn
        self._live: dict[str, int] = {}  # owners (tokens) whose steps run in this worker

    @property
    def coordination_store(self) -> CoordinationStore:
        """The coordination store, held by ``progress`` and shared with ``finisher``."""
        return self.progress.coordination_store

    @coordination_store.setter
    def coordination_store(self, store: CoordinationStore) -> None:
        self.progress.coordination_store = store

    # ==========================================================================================
    # Messages and jobs
    # ==========================================================================================

    async def handle_message(self, message: QueueMessage, *, requeue_deferred: bool = False,
                             slots: LocalSlots | None = None) -> tuple[JobOutcome, float]:
        """Process one received message: parse it (an unreadable one is dead-lettered and
        its run failed where it names one), check its receive count (hard limit; a job
        that only waited goes back as a fresh message before its count runs out), run the
        job. Returns the outcome and, for ``"deferred"``, the seconds to wait; with
        ``requeue_deferred`` a deferred job is sent again with that delay (``"requeued"``).
        With ``slots``, commits may claim more successors for them (:mod:`.slots`).
        """
        get_metrics().message_received(
            None if message.sent_at is None else time.time() - message.sent_at,
            redelivered=message.receive_count > 1)
        queue = self.backend.queue
        try:
            job = parse_job(message.body)
        except InvalidJobError as exc:
            logger.error("message %s removed: %s", message.message_id, exc.message)
            await queue.dead_letter(message, exc.message)
            await self.emit("job:failed", messageId=message.message_id, error=exc.message)
            if exc.run_id:
                await self.finisher.fail_run(exc.run_id, f"invalid job message: {exc.message}")
            return "dropped", 0.0
        limit = self.settings.hard_receive_limit
        if message.receive_count > limit and not await self._finished(job):
            # Attempts are counted in the run's item (step 2); this ceiling only catches a
            # message that keeps coming back without ever reaching a claim.
            reason = (f"job for node '{job.node_id}' was received {message.receive_count} times "
                      f"(hard limit {limit}); removed as a poison message")
            logger.error("run %s node %s: message %s %s", job.run_id, job.node_id,
                         message.message_id, reason)
            await queue.dead_letter(message, reason)
            await self.finisher.fail_run(job.run_id, reason, node_id=job.node_id)
            return "dropped", 0.0
        outcome, delay = await self._handle(job, message_id=message.message_id, message=message,
                                            slots=slots)
        if outcome == "deferred" and (requeue_deferred or
                                      message.receive_count >= self.settings.max_receive_count):
            # Waiting is not failing: before its receive count (what makes a message poison,
            # here and in a queue's redrive policy) runs out, a job that only waited goes
            # back as a fresh message.
            await queue.send([job], min(delay, queue.max_delay_seconds))
            return "requeued", 0.0
        return outcome, delay

    async def handle_job(self, job: JobPayload | Mapping[str, Any] | str | bytes, *,
                         requeue_deferred: bool = True) -> JobOutcome:
        """Process one job (see ``BaseDistributedAdapter.handle_job``)."""
        payload = job if isinstance(job, JobPayload) else parse_job(job)  # type: ignore[arg-type]
        outcome, delay = await self._handle(payload, message_id=None)
        if outcome == "deferred" and requeue_deferred:
            queue = self.backend.queue
            await queue.send([payload], min(delay, queue.max_delay_seconds))
            return "requeued"
        return outcome

    async def _finished(self, job: JobPayload) -> bool:
        """Whether the job's node already completed this iteration: a copy of a finished job
        (whose holders died before acknowledging it) is a duplicate, not a poison message,
        however often it was received; it must not fail the run."""
        data = await run_context(self.backend.runs, job.run_id).load()
        return data is not None and claim_status(
            data, job.node_id, job.iteration, "", time.time()) is ClaimStatus.DONE

    async def _handle(self, job: JobPayload, *, message_id: str | None,
                      message: QueueMessage | None = None,
                      slots: LocalSlots | None = None) -> tuple[JobOutcome, float]:
        with self._observed(job, message.receive_count if message else job.attempt) as span:
            outcome, delay = await self._handle_job(job, message_id=message_id,
                                                    message=message, slots=slots)
            if outcome != "processed":  # a node that ran has its own outcome (completed, ...)
                span.set_outcome(outcome)
            return outcome, delay

    @contextlib.contextmanager
    def _observed(self, job: JobPayload, attempt: int | None) -> Any:
        """Log lines and the trace span of one node execution."""
        worker_id = self.settings.worker_id
        with log_context(run_id=job.run_id, node_id=job.node_id, attempt=attempt,
                         worker_id=worker_id), get_tracer().span_for_node(
                job.run_id, job.blueprint_id, job.node_id, attempt, worker_id,
                parent=job.trace) as span:
            yield span

    # ==========================================================================================
    # Steps 1-2: look up, claim, check
    # ==========================================================================================

    async def _handle_job(self, job: JobPayload, *, message_id: str | None,
                          message: QueueMessage | None = None,
                          slots: LocalSlots | None = None) -> tuple[JobOutcome, float]:
        try:
            blueprint = self.engine.blueprint(job.blueprint_id)
            base_graph = self.engine.graph(blueprint)
        except UnknownBlueprintError as exc:
            return await self.finisher.unknown_blueprint(job, exc.message, message_id, message)
        except FlowcraftError as exc:
            return await self.finisher.remove(job, message_id, message, exc.message)
        if job.chunk is not None:
            return await self.ledger.run_chunk(job, blueprint, base_graph)
        context = run_context(self.backend.runs, job.run_id, base_graph)
        await self.checkpoint("before_claim", job)
        owner = self.lease_owner()
        with service_call("claim"):
            claim = await self.claims.claim(context, job.node_id, job.iteration, owner,
                                            self.settings.lease_seconds,
                                            self.snapshots.covering(job, base_graph)
                                            if self.settings.lean_writes else None)
        if claim.status is ClaimStatus.MISSING:
            return await self.finisher.remove(
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
            data = await arrive(context, self.coordination_store, job.node_id, claim.data,
                                redelivered=True)
            graph = graph_for(base_graph, data)
            region = _progress.same_execution(graph, data, job.node_id)
            now = time.time()  # before: a lease the advance saw live is waited for after
            await self._advance_and_enqueue(context, graph, blueprint, region, data)
            held = _progress.held_by_execution(graph, data, region, now, self._live)
            return ("deferred", max(1.0, held - time.time())) if held else ("duplicate", 0.0)
        data = claim.data
        refused = self.finisher.refusal(job, blueprint, data, message_id)
        if refused is not None:
            await self._release_unattempted(context, job.node_id, owner, data)
            return refused
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
        wake = wake_up_at(graph, data, job.node_id)
        if wake is not None and wake > time.time() + 0.5:
            # A durable sleep longer than the queue's longest delay: wait another round.
            await self._release_unattempted(context, job.node_id, owner, data)
            await self.backend.queue.send(
                [job], min(self.backend.queue.max_delay_seconds, wake - time.time()))
            return "requeued", 0.0
        started = attempts(data, job.node_id)
        limit = self.settings.max_receive_count
        if started > limit:
            reason = (f"it was attempted {started} times without finishing (limit "
                      f"{limit}); removed as a poison message")
            logger.error("run %s node %s: message %s %s", job.run_id, job.node_id, message_id,
                         reason)
            if message is not None:
                await self.backend.queue.dead_letter(
                    message, f"node '{job.node_id}' failed: {reason}")
            await self.finisher.fail_node(context, graph, job, owner, [], reason, {
                "nodeId": job.node_id, "message": reason, "attempt": started,
                "errorType": "PoisonMessage", "runId": job.run_id})
            return "dropped", 0.0
        self._live[owner_token(owner)] = self._live.get(owner_token(owner), 0) + 1
        await self._run_steps(context, base_graph, blueprint, _Step(job, data, owner, slots), True)
        return "processed", 0.0

    async def _run_steps(self, context: DistributedContext, base_graph: Graph,
                         blueprint: WorkflowBlueprint, first: _Step, observed: bool) -> None:
        """Run a claimed step and its continuations; the other claimed successors go to
        the lent slots (:mod:`.slots`). The caller counted the step's owner as live (in
        ``_live``: its redelivered jobs need not wait for its leases); this ends that."""
        step: _Step | None = first
        token = owner_token(first.owner)
        try:
            while step is not None:
                with (contextlib.nullcontext() if step is first and observed
                      else self._observed(step.job, None)):  # a local continuation
                    steps = await self._execute_claimed(context, base_graph, blueprint, step)
                for extra in steps[1:]:
                    assert extra.slots is not None
                    self._live[token] += 1
                    extra.slots.run(self._run_steps(context, base_graph, blueprint, extra, False))
                step = steps[0] if steps else None
        finally:
            self._live[token] -= 1
            if not self._live[token]:
                del self._live[token]

    # ==========================================================================================
    # Steps 3-7: run, route, commit, advance, enqueue
    # ==========================================================================================

    async def _execute_claimed(self, context: DistributedContext, base_graph: Graph,
                               blueprint: WorkflowBlueprint, step: _Step) -> list[_Step]:
        job, data, owner = step.job, step.data, step.owner
        run_state = data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            # A chain continued in this worker sees a cancel or failure only in the context
            # its last commit returned: stop here as a queued job would.
            await context.release(job.node_id, owner)
            logger.info("run %s node %s: run is %s; not continuing", job.run_id, job.node_id,
                        run_state.get("status"))
            return []
        if (step.claimed_at is not None and time.monotonic() - step.claimed_at
                > self.settings.lease_seconds / 3
                and not await context.renew(job.node_id, owner, self.settings.lease_seconds)):
            # The commit that claimed it took long to finish (a slow enqueue): its lease ran
            # out and another worker took the node over. It must not run here as well.
            logger.warning("run %s node %s: its lease lapsed before it could start here; "
                           "left to the worker that took it over", job.run_id, job.node_id)
            return []
        graph = graph_for(base_graph, data)
        if await self.ledger.resumed(context, graph, blueprint, job, owner, data):
            return []  # its map runs as a ledger: finished, or what a crash left unsent sent
        node = graph.nodes[job.node_id]  # checked by job_misfit, or a successor we routed to
        limit = self.runtime_options.max_node_iterations
        if job.iteration >= limit:
            # The in-memory runtime's limit and message: a cycle without an exit ends here.
            message = (f"node ran {job.iteration} times, the limit of max_node_iterations; "
                       "a loop without a reachable exit?")
            await self.finisher.fail_node(context, graph, job, owner, [], message, {
                "nodeId": job.node_id, "message": message, "attempt": 0,
                "errorType": "FlowcraftError", "runId": job.run_id})
            return []
        first_arrival = None
        if node.join_strategy == "any" and len(graph.forward_predecessors.get(node.id, ())) > 1:
            first_arrival = await self.coordination_store.get(
                any_key(job.run_id, node.id, job.iteration))
        resolved = resolve_input(graph, node, data, first_arrival)
        tracked = TrackedContext(data)
        if resolved.store:
            tracked.set_now(INPUTS_PREFIX + node.id, resolved.value)
        services = WorkerServices(self.engine, self.ledger)
        await self.emit("node:start", runId=job.run_id, nodeId=node.id, input=resolved.value)
        cancelled = CancellationSignal()  # set by the renewal when the run is cancelled
        renewer = asyncio.get_running_loop().create_task(
            keep_lease(context, node.id, owner, self.settings.lease_seconds, cancelled))
        try:
            await self.checkpoint("before_run", job)
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
            await self.checkpoint("after_run", job)
            if cancelled.is_set() and outcome.error is not None:
                # Stopped by its run's cancellation: not a failure of the node.
                await context.release(node.id, owner)
                return []
            await self.finisher.touch_status(job.run_id, job.blueprint_id)
            operations = list(tracked.deltas)
            if outcome.awaiting is not None:
                await self.finisher.park(context, graph, job, owner, operations, outcome.awaiting)
                return []
            if outcome.error is not None:
                await self.finisher.fail_node(context, graph, job, owner, operations,
                                              outcome.error.message, outcome.error.to_dict())
                return []
            assert outcome.result is not None
            if services.map_plan is not None:
                await self.ledger.start(context, graph, job, owner, operations,
                                        services.map_plan)
                return []
            return await self.commit_success(context, graph, blueprint, job, owner, tracked,
                                             operations, outcome.result, services.wake_up_at,
                                             slots=step.slots)
        finally:
            renewer.cancel()

    async def commit_success(
        self, context: DistributedContext, graph: Graph, blueprint: WorkflowBlueprint,
        job: JobPayload, owner: str, tracked: TrackedContext,
        operations: list[PatchOperation], result: NodeResult, wake_up_at: float | None, *,
        continue_locally: bool = True, slots: LocalSlots | None = None,
    ) -> list[_Step]:
        """Steps 4-7 for a node that completed (or was resumed) under ``owner``'s lease:
        route, commit, advance, enqueue. Returns the successors claimed in the commit: the
        local continuation first, then those for the lent ``slots`` (:mod:`.slots`)."""
        node_id = job.node_id
        working = tracked.data
        try:
            # The node has run: what can still go wrong is its result, which a rerun would
            # repeat, so it fails the node once (not a crash that retries until poison).
            check_operations(operations, node_id)
            check_storable(result.output, f"output of node '{node_id}'")
        except UnstorableValueError as exc:
            await self.finisher.fail_node(context, graph, job, owner, [], exc.message,
                                          result_error(job, exc))
            return []
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
            await self.finisher.fail_node(context, graph, job, owner, operations, str(exc),
                                          result_error(job, exc))
            return []
        record = completed_record(job.iteration, taken, result.action)
        record["by"] = owner_token(owner)  # tells our lost commit answer from another's
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
        skips, successors = commit_plan(graph, node_id, working)
        if mark_wide_fan(graph, node_id, working, operations, self.settings.lean_writes
                         and isinstance(self.coordination_store, FullCoordinationStore)):
            continue_locally = False  # each branch claims its own item (.homes)
        for skipped in skips:
            value = skipped_record(resolution_count(working, skipped))
            operations.append(PatchOperation("set", record_key(skipped), value))
            working[record_key(skipped)] = value
        claims, lent = successors[:0], 0
        if self.settings.local_continuation and continue_locally and wake_up_at is None:
            if slots is not None and len(successors) > 1:
                lent = await slots.take(len(successors) - 1)
            claims = successors[:1 + lent]
        for succ, _ in claims:
            # The claim in this commit counts the successor's attempt, as a claim does.
            operations.append(PatchOperation(
                "set", attempts_key(succ), 1 if succ == node_id else attempts(working, succ) + 1))
        # When what follows is decided by this commit alone (and the counts it returns), what
        # others wrote meanwhile changes nothing: the commit need not read the run back (a
        # chain or a fan's branch pays for the run's growing item once per node, not twice).
        lean = (self.settings.lean_writes and not result.dynamic_nodes
                and decided_alone(graph, node_id, skips, successors))
        steps: list[_Step] = []
        try:
            steps = await self._commit_and_advance(context, graph, blueprint, job, owner,
                                                   operations, result, skips, claims, slots,
                                                   working if lean else None)
        finally:
            if slots is not None and len(steps) < 1 + lent:
                slots.give_back(lent)  # not committed: the lent slots stay unused
        return steps

    async def _commit_and_advance(
        self, context: DistributedContext, graph: Graph, blueprint: WorkflowBlueprint,
        job: JobPayload, owner: str, operations: list[PatchOperation], result: NodeResult,
        skips: list[str], claims: list[tuple[str, int]], slots: LocalSlots | None,
        base: dict[str, Any] | None = None,
    ) -> list[_Step]:
        """Steps 5-7: commit (claiming ``claims``), advance, enqueue the rest."""
        node_id, claimed_at = job.node_id, time.monotonic()
        await self.checkpoint("before_commit", job)
        try:
            committed = await self.finisher.commit(context, job, owner, operations, claims,
                                                   base=base, counts=arrivals(graph, node_id))
        except (ContextTooLargeError, UnstorableValueError) as exc:
            # Running the node again would produce the same output: fail it now, clearly.
            await self.finisher.fail_node(context, graph, job, owner, [], exc.message,
                                          result_error(job, exc))
            return []
        if committed is None:
            logger.warning("run %s node %s: lease lost before commit (the node ran elsewhere);"
                           " this result is discarded", job.run_id, node_id)
            get_metrics().claim_lost()
            get_tracer().annotate(outcome="lost")
            return []
        await self.emit("node:finish", runId=job.run_id, nodeId=node_id, output=result.output,
                        action=result.action)
        await self.checkpoint("after_commit", job)
        if base is not None and last_arrival(graph, node_id, committed):
            committed = await context.load() or committed
        committed = await arrive(context, self.coordination_store, node_id, committed)
        graph = graph_for(graph.root, committed)  # with nodes others added meanwhile
        if _cancelled(committed):
            # Cancelled while the node ran: its result is kept, nothing after it runs.
            logger.info("run %s node %s: run cancelled; not advancing", job.run_id, node_id)
            for succ, _ in claims:
                await context.release(succ, owner, attempts=attempts(committed, succ) - 1)
            return []
        advance = await self.progress.advance(context, graph, [node_id, *skips], committed,
                                              continued=claims)
        claimed = set(claims)
        sent = [r for r in advance.ready if (r[0], r[1]) not in claimed]
        if sent or not claims:  # a chain goes on here and sends nothing: no copy to keep
            self.snapshots.keep(job.run_id, advance.data)
        await self.enqueue_ready(job.run_id, blueprint.id, sent)
        await self.checkpoint("after_enqueue", job)
        await self.emit("job:processed", runId=job.run_id, nodeId=node_id)
        trace = inject()
        # Each successor run in a lent slot works on a snapshot of its own.
        return [_Step(JobPayload(job.run_id, job.blueprint_id, succ, generation, trace=trace),
                      advance.data if index == 0 else deep_copy_json(advance.data), owner, slots,
                      claimed_at)
                for index, (succ, generation) in enumerate(claims)]

    async def _advance_and_enqueue(self, context: DistributedContext, graph: Graph,
                                   blueprint: WorkflowBlueprint, sources: Sequence[str],
                                   data: dict[str, Any]) -> list[str]:
        advance = await self.progress.advance(context, graph, sources, data)
        await self.enqueue_ready(context.run_id, blueprint.id, advance.ready)
        return [node_id for node_id, _, _ in advance.ready]

    async def enqueue_ready(self, run_id: str, blueprint_id: str,
                            ready: Iterable[tuple[str, int, float | None]]) -> None:
        """Step 7: send the jobs of ``ready`` (node, generation, when its sleep ends), those
        to start now in one batch, the delayed ones grouped by delay."""
        queue = self.backend.queue
        now_jobs: list[JobPayload] = []
        delayed: dict[float, list[JobPayload]] = {}
        now = time.time()
        trace = inject()  # the enqueuing node's span: the parent of the successors' spans
        for node_id, generation, wake in ready:
            job = JobPayload(run_id, blueprint_id, node_id, generation, trace=trace)
            if wake is not None and wake > now + 0.5:
                delay = min(queue.max_delay_seconds, wake - now)
                delayed.setdefault(round(delay, 1), []).append(job)
            else:
                now_jobs.append(job)
        if now_jobs:
            with service_call("enqueue"):
                await queue.send(now_jobs, 0)
        for delay, jobs in delayed.items():
            with service_call("enqueue"):
                await queue.send(jobs, delay)
        for job in [*now_jobs, *(j for jobs in delayed.values() for j in jobs)]:
            await self.emit("job:enqueued", runId=run_id, nodeId=job.node_id)

    # -- Step 8: park, fail; refused jobs (in .finish); leases, events --------------------------

    async def _release_unattempted(self, context: DistributedContext, node_id: str,
                                   owner: str, data: Mapping[str, Any]) -> None:
        """Release a claim that did not run the node: its attempt does not count."""
        await context.release(node_id, owner, attempts=attempts(data, node_id) - 1)

    def lease_owner(self) -> str:
        """A lease owner for one job execution: the worker id plus a token, so two
        deliveries of one job on the same worker never both hold the node's lease."""
        return f"{self.settings.worker_id}/{uuid.uuid4().hex[:8]}"

    async def emit(self, event_type: str, **payload: Any) -> None:
        if self.event_bus is not None:
            await safe_emit(self.event_bus, FlowcraftEvent(event_type, payload))


def _cancelled(data: Mapping[str, Any]) -> bool:
    run_state = data.get(RUN_STATE_KEY)
    return isinstance(run_state, Mapping) and run_state.get("status") == "cancelled"
