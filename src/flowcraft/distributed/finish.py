"""How a job ends when it does not route onward, and the write every node's end goes through.

Step 8 of the job algorithm (:mod:`.algorithm`) and the refusals of step 1:

* :meth:`Finisher.commit` — a node's end is one conditional write under its
  lease; when no success came back (an error after the write applied, or an SDK
  retry that then fails the condition), the item is read and a record naming
  this lease owner counts as committed. Success and failure both go through it;
* :meth:`Finisher.park` — a ``wait`` node parks: its entry in
  ``_awaitingNodeIds`` is written under a short lease on that list
  (:meth:`Finisher.lock_awaiting`), so parallel parks and resumes never lose
  each other's update; the run is set ``awaiting`` once nothing else can run;
* :meth:`Finisher.fail_node` — a failure record (so nothing that needed the
  node ever runs), poison / cancel markers for its ``all`` / ``any``
  successors, and the run failed;
* :meth:`Finisher.fail_run` — the status record set ``failed`` with the
  reason, only while it is ``running`` and only for a run that has a record;
* :meth:`Finisher.remove` and :meth:`Finisher.unknown_blueprint` — a job that
  can never run is dead-lettered (its run failed); one naming a blueprint this
  worker lacks waits for a worker that has it, for a grace period counted from
  the first sighting by any worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..blueprint import WorkflowBlueprint
from ..context import PatchOperation, check_storable
from ..core.graph import Graph
from ..core.routing import AWAITING_DETAILS_KEY, AWAITING_IDS_KEY, failed_record, record_key
from ..errors import ContextTooLargeError, FlowcraftError, UnstorableValueError
from ..observability import get_metrics, service_call
from .backend import FINAL_STATUSES, Backend, QueueMessage, now_iso, parse_timestamp
from .context import (
    BLUEPRINT_KEY,
    RUN_STATE_KEY,
    VERSION_KEY,
    ClaimStatus,
    DistributedContext,
    lock_key,
    owner_token,
)
from .coordination import COORDINATION_TTL_SECONDS, cancel_key, poison_key
from .homes import BranchItemsContext, run_context
from .job import JobPayload
from .options import WorkerSettings
from .progress import Emit, Progress

if TYPE_CHECKING:
    from .algorithm import JobOutcome

logger = logging.getLogger("flowcraft.distributed")

AWAITING_LOCK = "_flowcraft:awaiting"
"""A pseudo node whose lease serialises changes of the run's awaiting list."""


class Finisher:
    """Ends jobs (see the module docstring) over a backend; the coordination store is
    ``progress``'s, shared with the advance of runs."""

    def __init__(self, backend: Backend, progress: Progress, settings: WorkerSettings,
                 emit: Emit) -> None:
        self.backend = backend
        self.progress = progress
        self.settings = settings
        self.emit = emit
        self._status_touched: dict[str, float] = {}

    async def touch_status(self, run_id: str, blueprint_id: str | None = None) -> None:
        """Record progress (``lastUpdated``) at most every ``status_touch_seconds``; also the
        blueprint id, which status records written by other clients may lack."""
        now = time.monotonic()
        last = self._status_touched.get(run_id)
        if last is not None and now - last < self.settings.status_touch_seconds:
            return
        if len(self._status_touched) > 10_000:
            self._status_touched.clear()
        self._status_touched[run_id] = now
        with contextlib.suppress(Exception):
            fields = {"lastUpdated": now_iso(),
                      **({"blueprintId": blueprint_id} if blueprint_id else {})}
            await self.backend.statuses.write(run_id, fields, only_if_running=True)

    def refusal(self, job: JobPayload, blueprint: WorkflowBlueprint, data: Mapping[str, Any],
                message_id: str | None = None) -> tuple[JobOutcome, float] | None:
        """Why a job (a node's, or a map chunk's) must not run on the run as stored, logged,
        as its outcome: the run ended (dropped), it belongs to another blueprint (dropped),
        or to another version of this one (deferred, for a worker that has it). ``None``:
        none of these."""
        run_state = data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            logger.info("run %s node %s: run is %s; job dropped", job.run_id, job.node_id,
                        run_state.get("status"))
            return "dropped", 0.0
        stored_blueprint = data.get(BLUEPRINT_KEY)
        if stored_blueprint is not None and stored_blueprint != job.blueprint_id:
            logger.error("run %s node %s: message %s names blueprint '%s' but the run belongs "
                         "to blueprint '%s'; job dropped", job.run_id, job.node_id, message_id,
                         job.blueprint_id, stored_blueprint)
            return "dropped", 0.0
        stored_version = data.get(VERSION_KEY)
        if (stored_version is not None and blueprint.version is not None
                and str(stored_version) != str(blueprint.version)):
            logger.error(
                "run %s node %s: run was started with version %s of blueprint '%s' but this "
                "worker has version %s; leaving the job for a matching worker",
                job.run_id, job.node_id, stored_version, blueprint.id, blueprint.version,
            )
            return "deferred", min(60.0, self.backend.queue.max_delay_seconds)
        return None

    async def commit(self, context: DistributedContext, job: JobPayload, owner: str,
                     operations: Sequence[PatchOperation],
                     claims: Sequence[tuple[str, int]] = (), *,
                     base: Mapping[str, Any] | None = None,
                     counts: Mapping[str, int] | None = None) -> dict[str, Any] | None:
        """Commit, and when no success came back read the item: a write whose answer was
        lost (an error after it applied; a retry that then failed its condition) shows our
        own record, and counts as committed. ``None``: the lease was lost. ``base``: see
        :meth:`~flowcraft.distributed.context.DistributedContext.commit`."""
        failure: Exception | None = None
        try:
            with service_call("commit"):
                committed = await context.commit(job.node_id, job.iteration, owner, operations,
                                                 claims, self.settings.lease_seconds,
                                                 base=base, counts=counts)
        except (ContextTooLargeError, UnstorableValueError):
            raise
        except Exception as exc:
            failure, committed = exc, None
        if committed is not None:
            return committed
        data = await context.load()
        record = (data or {}).get(record_key(job.node_id))
        if (isinstance(record, Mapping) and record.get("by") == owner_token(owner)
                and record.get("n") == job.iteration + 1):
            logger.warning("run %s node %s: the commit's answer was lost (%s) but the write "
                           "landed; continuing", job.run_id, job.node_id,
                           failure or "condition failed on a retry")
            if data is not None and isinstance(context, BranchItemsContext):
                await context.settle(job.node_id, data)  # its shared writes may not have
            return data
        if failure is not None:
            raise failure
        return None

    async def park(self, context: DistributedContext, graph: Graph, job: JobPayload,
                   owner: str, operations: list[PatchOperation],
                   details: dict[str, Any]) -> None:
        """Commit a ``wait`` node's writes and its entry in the awaiting list."""
        # The awaiting node keeps no record: resume_with_action completes it.
        snapshot = await self.lock_awaiting(context, owner)
        if snapshot is None:
            return None
        ids = list(snapshot.get(AWAITING_IDS_KEY) or [])
        if job.node_id not in ids:
            ids.append(job.node_id)
        all_details = dict(snapshot.get(AWAITING_DETAILS_KEY) or {})
        all_details[job.node_id] = {**details, "iteration": job.iteration}
        operations += [PatchOperation("set", AWAITING_IDS_KEY, ids),
                       PatchOperation("set", AWAITING_DETAILS_KEY, all_details),
                       PatchOperation("delete", lock_key(AWAITING_LOCK))]
        committed = await context.commit(job.node_id, job.iteration, owner, operations)
        if committed is None:
            await context.release(AWAITING_LOCK, owner)
            return None
        logger.info("run %s node %s: awaiting (%s)", job.run_id, job.node_id,
                    details.get("reason"))
        await self.progress.maybe_complete(job.run_id, graph, committed)
        return None

    async def lock_awaiting(self, context: DistributedContext,
                            owner: str) -> dict[str, Any] | None:
        """Take the lease that serialises changes of ``_awaitingNodeIds`` (parks and resumes
        of different nodes write that one list); return the context as it is now, or
        ``None`` if the run has no context. The caller's commit deletes the lease."""
        while True:
            claim = await context.claim(AWAITING_LOCK, 0, owner, self.settings.lease_seconds,
                                        count_attempt=False)
            if claim.status is ClaimStatus.CLAIMED:
                return claim.data
            if claim.status is ClaimStatus.MISSING:
                return None
            await asyncio.sleep(0.01 + (uuid.uuid4().int % 40) / 1000)

    async def fail_node(self, context: DistributedContext, graph: Graph, job: JobPayload,
                        owner: str, operations: list[PatchOperation], message: str,
                        error: dict[str, Any]) -> None:
        """Record the node's failure (with its writes, where they can be stored), mark its
        successors, fail the run."""
        reason = f"node '{job.node_id}' failed: {message}"
        record = {**failed_record(job.iteration, message, error), "by": owner_token(owner),
                  "t": round(time.time(), 6)}
        failure = [
            PatchOperation("set", record_key(job.node_id), record),
            PatchOperation("set", RUN_STATE_KEY, {"status": "failed", "reason": reason,
                                                  "error": error}),
        ]
        try:
            check_operations(operations, job.node_id)
            committed = await self.commit(context, job, owner, [*operations, *failure])
        except (ContextTooLargeError, UnstorableValueError):
            # The node's own writes cannot be stored: record the failure without them.
            committed = await self.commit(context, job, owner, failure)
        if committed is None:
            return
        logger.error("run %s node %s failed: %s", job.run_id, job.node_id, message)
        await self.emit("node:error", runId=job.run_id, nodeId=job.node_id, error=error)
        for target in graph.forward_successors(job.node_id):
            strategy = graph.nodes[target].join_strategy
            key = cancel_key(job.run_id, target) if strategy == "any" else poison_key(
                job.run_id, target)
            await self.progress.coordination_store.set_if_not_exist(
                key, job.node_id, COORDINATION_TTL_SECONDS)
        await self.fail_run(job.run_id, reason, node_id=job.node_id, error=error)

    async def unknown_blueprint(self, job: JobPayload, reason: str, message_id: str | None,
                                message: QueueMessage | None) -> tuple[JobOutcome, float]:
        """A job naming a blueprint this worker lacks: during a rolling deploy another worker
        has it. Leave the job for that worker for ``unknown_blueprint_grace_seconds`` from the
        first sighting (kept in the coordination store, shared by all workers); then fail."""
        data = await run_context(self.backend.runs, job.run_id).load()
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
            return await self.remove(job, message_id, message, drop, fail_run=False)
        now = time.time()
        key = f"flowcraft:unknown-blueprint:{job.run_id}:{job.blueprint_id}"
        coordination = self.progress.coordination_store
        await coordination.set_if_not_exist(key, repr(now), COORDINATION_TTL_SECONDS)
        first_seen = parse_timestamp(await coordination.get(key)) or now
        waited = now - first_seen
        grace = self.settings.unknown_blueprint_grace_seconds
        if waited < grace:
            logger.warning("run %s node %s: %s on this worker; leaving the job for a worker "
                           "that has it (waited %.0fs of %.0fs)", job.run_id, job.node_id,
                           reason, waited, grace)
            return "deferred", max(1.0, min(grace - waited, 60.0,
                                            self.backend.queue.max_delay_seconds))
        return await self.remove(
            job, message_id, message,
            f"{reason}; no worker that has it took the job within {grace:g}s")

    async def remove(self, job: JobPayload, message_id: str | None,
                     message: QueueMessage | None, reason: str, *,
                     fail_run: bool = True) -> tuple[JobOutcome, float]:
        """Remove a job that can never run (dead-lettered where possible), logged with its
        message id; the run, unless ``fail_run`` is false, is marked failed with the reason."""
        logger.error("run %s node %s: message %s removed: %s", job.run_id, job.node_id,
                     message_id, reason)
        if message is not None:
            await self.backend.queue.dead_letter(message, reason)
        if fail_run:
            await self.fail_run(job.run_id, reason, node_id=job.node_id)
        return "dropped", 0.0

    async def fail_run(self, run_id: str, reason: str, *, node_id: str | None = None,
                       error: Mapping[str, Any] | None = None) -> None:
        """Set the run's status ``failed`` with the reason (while it is ``running``)."""
        fields: dict[str, Any] = {"status": "failed", "finalStatus": "failed",
                                  "lastUpdated": now_iso(), "error": reason}
        if node_id:
            fields["failedNodeId"] = node_id
        if error:
            # Type, message and the end of the traceback (at most 4 KB), for status readers.
            fields["failure"] = {key: error[key] for key in
                                 ("nodeId", "errorType", "message", "attempt", "traceback")
                                 if error.get(key) is not None}
        statuses = self.backend.statuses
        try:
            if await statuses.read(run_id) is None:
                # No such run (a garbage message naming a run id): create no record for it.
                logger.error("run %s: not failed, no such run is recorded (%s)", run_id, reason)
                return
            written = await statuses.write(run_id, fields, only_if_running=True)
        except Exception:
            logger.exception("run %s: could not record the failure", run_id)
            return
        if written:
            get_metrics().run_finished("failed")
            await self.emit("workflow:finish", runId=run_id, status="failed", error=reason)
            await self.emit("job:failed", runId=run_id, nodeId=node_id, error=reason)


def check_operations(operations: Iterable[PatchOperation], node_id: str) -> None:
    """Refuse (``UnstorableValueError``) a context write no store can hold."""
    for operation in operations:
        if operation.op == "set":
            check_storable(operation.value,
                           f"context key '{operation.key}' written by node '{node_id}'")


def result_error(job: JobPayload, exc: Exception) -> dict[str, Any]:
    """The failure record of a node that failed after it ran (its result is the problem)."""
    message = exc.message if isinstance(exc, FlowcraftError) else str(exc)
    return {"nodeId": job.node_id, "message": message, "attempt": 1,
            "errorType": type(exc).__name__, "runId": job.run_id}
