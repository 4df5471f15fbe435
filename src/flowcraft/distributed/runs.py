"""``RunClient``: the client side of the distributed engine — start, observe, repair, resume.

Nothing here runs a node; a client needs the blueprints but not the nodes'
implementations (routing is computed from the blueprint alone).

``start_workflow``
    Step 0 of the job algorithm (:mod:`.algorithm`): the run's context is
    stored with a conditional create (a taken run id raises
    ``RunAlreadyExistsError`` and leaves that run untouched), carrying the
    blueprint id and version; then the status record (``running``); then the
    start nodes' jobs, in one batch.
``get_run_status`` / ``wait_for_result``
    The status record; polled until the run rests (completed, failed,
    cancelled or awaiting), then the context read once for the result.
``reconcile``
    The repair of a run whose messages were lost (a crash between commit and
    enqueue): the ready frontier is recomputed from the node records, lost skips
    are written, the nodes neither done nor leased are enqueued again, and a
    missed completion is published. Safe at any time: a job sent twice is a
    duplicate the algorithm recognises.
``resume_with_action``
    Completes a parked ``wait`` node with an output (``action`` routes from it)
    through the algorithm's own commit path, under the awaiting-list lease that
    parks also take.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

from ..analysis import analyze_blueprint
from ..blueprint import WorkflowBlueprint
from ..context import PatchOperation, TrackedContext, public_view, validate_initial_context
from ..core.graph import Graph, graph_for
from ..core.results import WorkflowResult, serialize_context
from ..core.routing import (
    AWAITING_DETAILS_KEY,
    AWAITING_IDS_KEY,
    read_record,
    record_key,
    resolution_count,
    skipped_record,
)
from ..core.successors import frontier
from ..errors import BlueprintValidationError, FlowcraftError
from ..nodes.base import NodeResult
from ..observability import get_metrics, get_tracer, inject, service_call
from .algorithm import JobAlgorithm
from .backend import RESTING_STATUSES, Backend, now_iso
from .context import BLUEPRINT_KEY, RUN_STATE_KEY, VERSION_KEY, ClaimStatus, live_lease, lock_key
from .finish import AWAITING_LOCK
from .homes import run_context
from .job import JobPayload

logger = logging.getLogger("flowcraft.distributed")


class RunClient:
    """Starts and observes runs over ``backend``; repairs and resumes them with
    ``algorithm`` (whose engine, blueprints and settings it uses)."""

    def __init__(self, backend: Backend, algorithm: JobAlgorithm) -> None:
        self.backend = backend
        self.algorithm = algorithm

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
        bp = blueprint if isinstance(blueprint, WorkflowBlueprint) else (
            self.algorithm.engine.blueprint(blueprint))
        run_id = run_id or str(uuid.uuid4())
        initial = validate_initial_context(initial_context)
        if bp.version is not None:
            initial[VERSION_KEY] = bp.version
        initial[BLUEPRINT_KEY] = bp.id
        # A conditional create: a taken run id raises RunAlreadyExistsError here, before the
        # status record or any job is written, and the existing run is left untouched.
        await run_context(self.backend.runs, run_id).create(initial)
        started = now_iso()  # the run view's start time and duration
        await self.backend.statuses.write(run_id, {"status": "running", "lastUpdated": started,
                                                   "startedAt": started, "blueprintId": bp.id},
                                          only_if_running=False)
        starts = analyze_blueprint(bp).start_node_ids
        with get_tracer().run_span(run_id, bp.id):
            trace = inject()  # the start nodes' spans are children of the run's
            with service_call("enqueue"):
                await self.backend.queue.send([JobPayload(run_id, bp.id, node_id, trace=trace)
                                               for node_id in starts], 0)
        get_metrics().run_started()
        logger.info("run %s started (%s, start nodes %s)", run_id, bp.id, starts)
        return run_id

    async def get_run_status(self, run_id: str) -> dict[str, Any] | None:
        return await self.backend.statuses.read(run_id)

    async def wait_for_result(self, run_id: str, timeout: float = 60.0,
                              poll_interval: float = 0.25) -> WorkflowResult:
        """Poll until the run rests (completed, failed, cancelled or awaiting)."""
        deadline = time.monotonic() + timeout
        while True:
            status = await self.backend.statuses.read(run_id)
            if status and status.get("status") in RESTING_STATUSES:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} did not finish within {timeout:g}s "
                                   f"(status: {status.get('status') if status else 'unknown'})")
            await asyncio.sleep(poll_interval)
        data = await run_context(self.backend.runs, run_id).load() or {}
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
        progress = self.algorithm.progress
        status = await self.backend.statuses.read(run_id)
        blueprint_id = (status or {}).get("blueprintId")
        context = run_context(self.backend.runs, run_id)
        data = await context.load()
        if data is None:
            raise FlowcraftError(f"cannot reconcile run '{run_id}': no stored context",
                                 run_id=run_id)
        if not blueprint_id:
            blueprint_id = data.get(BLUEPRINT_KEY) or self._infer_blueprint_id(data)
        blueprint = self.algorithm.engine.blueprint(blueprint_id)
        graph = graph_for(self._routing_graph(blueprint), data)
        pending = frontier(graph, data)
        ready, skip = [r.node_id for r in pending.ready], pending.skip
        if skip:
            data = await context.apply([
                PatchOperation("set", record_key(t), skipped_record(resolution_count(data, t)))
                for t in skip
            ]) or data
            advance = await progress.advance(context, graph, skip, data)
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
        await self.algorithm.enqueue_ready(run_id, blueprint.id, jobs)
        await progress.maybe_complete(run_id, graph, data)
        if jobs:
            logger.info("run %s reconciled: re-enqueued %s", run_id, [j[0] for j in jobs])
        return [j[0] for j in jobs]

    def _routing_graph(self, blueprint: WorkflowBlueprint) -> Graph:
        """The graph for routing alone (reconcile runs no node, so a reconciler need not
        have the nodes' implementations)."""
        try:
            return self.algorithm.engine.graph(blueprint)
        except BlueprintValidationError:
            return Graph(blueprint)

    def _infer_blueprint_id(self, data: Mapping[str, Any]) -> str:
        known = list(self.algorithm.runtime_options.blueprints)
        if len(known) == 1:
            return known[0]
        raise FlowcraftError("cannot tell the run's blueprint: its status record has no "
                             "blueprintId and this worker knows several blueprints")

    async def resume_with_action(self, run_id: str, action: str | None = None,
                                 output: Any = None, node_id: str | None = None,
                                 *, blueprint_id: str | None = None) -> list[str]:
        """Complete an awaiting node with ``output``; ``action`` routes from it. Returns the
        node ids enqueued."""
        algorithm = self.algorithm
        context = run_context(self.backend.runs, run_id)
        data = await context.load()
        if data is None:
            raise FlowcraftError(f"cannot resume run '{run_id}': no stored context",
                                 run_id=run_id)
        awaiting = list(data.get(AWAITING_IDS_KEY) or [])
        target = node_id or (awaiting[0] if awaiting else None)
        if target is None or target not in awaiting:
            raise FlowcraftError(f"cannot resume run '{run_id}': node {target!r} is not "
                                 f"awaiting (awaiting: {awaiting})", run_id=run_id)
        status = await self.backend.statuses.read(run_id) or {}
        blueprint = algorithm.engine.blueprint(
            blueprint_id or status.get("blueprintId") or data.get(BLUEPRINT_KEY)
            or self._infer_blueprint_id(data))
        graph = graph_for(self._routing_graph(blueprint), data)  # a client has no registry
        iteration = int((data.get(AWAITING_DETAILS_KEY) or {}).get(target, {}).get(
            "iteration", resolution_count(data, target)))
        owner = algorithm.lease_owner()
        if await algorithm.finisher.lock_awaiting(context, owner) is None:
            raise FlowcraftError(f"cannot resume run '{run_id}': no stored context",
                                 run_id=run_id)
        try:
            claim = await context.claim(target, iteration, owner,
                                        algorithm.settings.lease_seconds)
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
            tracked.delete_now(lock_key(AWAITING_LOCK))  # released by the same commit
            await self.backend.statuses.write(run_id, {"status": "running",
                                                       "lastUpdated": now_iso()},
                                              only_if_running=False)
            job = JobPayload(run_id, blueprint.id, target, iteration)
            steps = await algorithm.commit_success(
                context, graph, blueprint, job, owner, tracked, list(tracked.deltas),
                NodeResult(output=output, action=action), None, continue_locally=False,
            )
            assert not steps
        finally:
            await context.release(AWAITING_LOCK, owner)  # a no-op once committed
        logger.info("run %s node %s resumed with action %r", run_id, target, action)
        return [target]
