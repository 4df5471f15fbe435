"""Map ledgers: a ``batch-scatter`` over many items, without growing the run's item.

In memory, and on workers for small maps, a ``batch-scatter`` adds one node per item to
its run (:mod:`flowcraft.nodes.builtins`). On a worker that would put a definition, a
routing record, an input and an output per item into the run's single item: the item
grows with the map, every commit rewrites (and is billed for) all of it, and a map of a
few thousand items reaches the database's item limit. So a worker runs a map of at
least ``map_ledger_min_items`` items as a *map ledger* instead, whose items are not
nodes of the run:

**Starting** (the scatter's job). The scatter node runs as any node; ``ctx.engine``
(:class:`~flowcraft.distributed.services.WorkerServices`) takes the map over
(``start_map``) and returns a :class:`MapPlan`. The items are split into chunks of at
most ``map_chunk_items`` items (fewer when items are large, so that a chunk's item
stays near :data:`CHUNK_BYTES`; with the scatter's ``chunkSize``, chunks of that many,
run one after the other: the TypeScript library's waves). Each chunk is stored as an
item of its own: a context in the run store under a derived run id
(:func:`chunk_run_id`: the run, a digest of the node id, the generation, the token of this
execution of the scatter and the chunk's index), holding ``items`` and ``start`` (the index
of its first item); an earlier attempt that crashed left chunks under another token, which
nothing reads. Then the
scatter's commit — conditioned on its lease, as every commit — writes the map's marker
``_flowcraft.map.<nodeId>`` (generation, item count, chunk count, chunk size, the
worker's ``uses`` key, the gather's id, whether it runs in waves, the token) and no
routing record:
the scatter stays unresolved, so nothing after it runs and the run cannot be declared
finished. Then one job per chunk is sent (the first only, in waves); a job names the
node, its generation and ``chunk``.

**A chunk's job** reads the run's item (its marker, its state, the context the workers
see), claims the chunk's item (a lease on the chunk's node :data:`CHUNK_NODE`, with its
attempt count: the node algorithm's claim, on another item), runs the chunk's items
through the node engine — each as the worker node ``<scatterId>_worker_<i>``, with the
worker's retries, timeout and fallback, at most ``concurrency`` at once — and commits the
chunk's item with the results (and any context writes of the workers), exactly once,
conditioned on the lease. A job that finds the chunk committed already (a redelivery)
goes straight to the next step, which is safe to repeat:

**Counting.** The chunk's index is added to the map's set in the coordination store
(``join_add``: adding a member twice counts once, so a redelivered job never counts
twice). In waves, the next chunk's job is sent. The job that sees every chunk counted
**finishes** the map: it claims the scatter node, reads the chunks' results in order,
and commits the scatter's output ``{"gatherNodeId", "ledger": true, "count",
"results"}`` with the workers' context writes, removing the marker, through the same
commit-route-advance path as every node; the gather outputs those results. A scatter
claimed while its marker stands (a redelivered or reconciled job: whatever a crash left
unsent) counts the chunks done: all done, it finishes the map; otherwise it sends the
jobs of the chunks not done (in waves, the first of them) and lets go.

A failed item fails the scatter (with the worker's error) and so the run; a chunk
attempted more than ``max_receive_count`` times without finishing does the same. The
failure is first kept on the chunk's item, under the chunk's lease (a worker whose lease
lapsed while another took the chunk over fails nothing), so a job that finds the scatter
held comes back and fails it without running the items again. A chunk job checks the
run's blueprint id and version as a node's job does.

**Cost.** Per chunk: its creation, a read of the run's item, a claim, a commit, a
``join_add``, and a message (receive, delete, and its share of a batched send): a few
requests per ``map_chunk_items`` items, whatever the map's size; the run's item holds the
marker while the map runs and the results once it is done (large values go to the
payload store when one is configured: :mod:`flowcraft.adapters.claimcheck`). Finishing
reads every chunk once.

Needs a coordination store with ``join_add`` (every store flowcraft provides has it);
with another store, maps add nodes as in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..blueprint import NodeDefinition, WorkflowBlueprint
from ..context import PatchOperation, TrackedContext, check_storable
from ..core.graph import Graph, graph_for
from ..core.routing import completed_record, record_key, resolution_count
from ..errors import ContextTooLargeError, FlowcraftError, UnstorableValueError
from ..nodes.base import CancellationSignal, NodeResult
from ..nodes.builtins import LEDGER_RESULTS, worker_node_id
from ..observability import get_metrics, inject
from .backend import FINAL_STATUSES
from .context import (
    RUN_STATE_KEY,
    Claim,
    ClaimStatus,
    DistributedContext,
    attempts,
    id_digest,
    keep_lease,
    map_key,
    owner_token,
)
from .coordination import COORDINATION_TTL_SECONDS, KEY_PREFIX, FullCoordinationStore
from .finish import result_error
from .homes import run_context
from .job import JobPayload

if TYPE_CHECKING:
    from .algorithm import JobAlgorithm, JobOutcome

logger = logging.getLogger("flowcraft.distributed")

CHUNK_NODE = "chunk"
"""The one node of a chunk's item: its lease, attempts and record."""
FAILURE_KEY = "failure"
"""On a chunk's item: the failure of one of its items, kept until the scatter is failed."""
CHUNK_BYTES = 8192
"""About how much JSON of items one chunk holds, when no ``chunkSize`` is given."""
IO_CONCURRENCY = 16
"""Chunk items created, or read, at once."""

T = TypeVar("T")


def chunk_run_id(run_id: str, node_id: str, generation: int, token: str, index: int) -> str:
    """The derived run id under which a chunk's item is stored: the node id as a digest (ids
    of stored items may not hold every character a node id can), and the token of the
    scatter's execution that stored it, so a crashed earlier attempt's chunks are never
    taken for this one's."""
    return f"{run_id}~map~{id_digest(node_id)}~{generation}~{token}~{index}"


def done_key(run_id: str, node_id: str, generation: int) -> str:
    """The coordination store's set of the chunks of a map that are done."""
    return f"{KEY_PREFIX}map:{run_id}:{node_id}:{generation}"


@dataclass(frozen=True, slots=True)
class MapPlan:
    """What a scatter's ``start_map`` decided: the map runs as a ledger."""

    items: list[Any]
    worker_uses: str
    gather_id: str
    chunk_items: int
    wave: bool
    """The scatter's ``chunkSize`` was given: one chunk at a time."""

    @property
    def chunks(self) -> int:
        return math.ceil(len(self.items) / self.chunk_items)


def marker_of(data: Mapping[str, Any], node_id: str, generation: int) -> dict[str, Any] | None:
    """The marker of the node's map at ``generation``, if one is running."""
    marker = data.get(map_key(node_id))
    if isinstance(marker, Mapping) and marker.get("g") == generation:
        return dict(marker)
    return None


def chunk_items_for(items: Sequence[Any], limit: int) -> int:
    """How many items go into one chunk: at most ``limit``, and about :data:`CHUNK_BYTES`
    of their JSON (estimated from up to 64 items spread over the list)."""
    step = max(1, len(items) // 64)
    sample = items[::step][:64]
    sizes = [len(json.dumps(item, separators=(",", ":"), default=str)) for item in sample]
    average = max(1.0, sum(sizes) / max(1, len(sizes)))
    return max(1, min(limit, int(CHUNK_BYTES // average)))


async def bounded(function: Callable[[T], Awaitable[Any]], values: Iterable[T],
                  limit: int = IO_CONCURRENCY) -> list[Any]:
    """``function`` over ``values``, at most ``limit`` at once; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(value: T) -> Any:
        async with semaphore:
            return await function(value)

    return list(await asyncio.gather(*(one(value) for value in values)))


class MapLedger:
    """Runs map ledgers (see the module docstring) for one worker's job algorithm."""

    def __init__(self, algorithm: JobAlgorithm) -> None:
        self.algorithm = algorithm

    @property
    def coordination(self) -> FullCoordinationStore | None:
        store = self.algorithm.coordination_store
        return store if isinstance(store, FullCoordinationStore) else None

    def plan(self, items: list[Any], worker_uses: str, gather_id: str,
             chunk_size: int | None) -> MapPlan | None:
        """A ledger for a map of ``items``, or ``None``: too small, or no ``join_add``."""
        settings = self.algorithm.settings
        if len(items) < settings.map_ledger_min_items or self.coordination is None:
            return None
        size = chunk_size if chunk_size is not None else chunk_items_for(
            items, settings.map_chunk_items)
        return MapPlan(items, worker_uses, gather_id, size, chunk_size is not None)

    def _chunk(self, job: JobPayload, marker: Mapping[str, Any],
               index: int) -> DistributedContext:
        return self.algorithm.backend.runs.context(chunk_run_id(
            job.run_id, job.node_id, job.iteration, str(marker["token"]), index))

    # ==========================================================================================
    # Starting, and a scatter claimed while its map runs
    # ==========================================================================================

    async def start(self, context: DistributedContext, graph: Graph, job: JobPayload,
                    owner: str, operations: list[PatchOperation], plan: MapPlan) -> None:
        """Store the chunks, commit the marker (under the scatter's lease), send the jobs. A
        chunk the store cannot hold (over its item limit, with no payload store) fails the
        scatter at once, saying so: running it again would store the same chunk."""
        marker = {"g": job.iteration, "count": len(plan.items), "chunks": plan.chunks,
                  "size": plan.chunk_items, "uses": plan.worker_uses,
                  "gather": plan.gather_id, "wave": plan.wave, "token": owner_token(owner)}
        size = plan.chunk_items

        async def create(index: int) -> None:
            await self._chunk(job, marker, index).create(
                {"items": plan.items[index * size:(index + 1) * size], "start": index * size})

        finisher = self.algorithm.finisher
        try:
            await bounded(create, range(plan.chunks))
            committed = await finisher.commit(context, job, owner, [
                *operations, PatchOperation("set", map_key(job.node_id), marker)])
        except (ContextTooLargeError, UnstorableValueError) as exc:
            reason = f"its map could not be stored: {exc.message}"
            await finisher.fail_node(context, graph, job, owner, [], reason,
                                     {**result_error(job, exc), "message": reason})
            return
        if committed is None:
            logger.warning("run %s node %s: lease lost before the map could start; left to "
                           "the worker that took the node over", job.run_id, job.node_id)
            return
        logger.info("run %s node %s: map of %d items in %d chunks of %d%s", job.run_id,
                    job.node_id, len(plan.items), plan.chunks, size,
                    ", one after the other" if plan.wave else "")
        await self._send(job, [0] if plan.wave else range(plan.chunks))

    async def resumed(self, context: DistributedContext, graph: Graph,
                      blueprint: WorkflowBlueprint, job: JobPayload, owner: str,
                      data: dict[str, Any]) -> bool:
        """A node claimed by ``owner`` whose map runs (its marker is at the job's
        iteration): finish the map if every chunk is done, else send the jobs of those that
        are not (what a crash may have left unsent) and let the node go. ``False``: the node
        runs no map."""
        marker = marker_of(data, job.node_id, job.iteration)
        if marker is None:
            return False
        await self._resume(context, graph, blueprint, job, owner, data, marker)
        return True

    async def _resume(self, context: DistributedContext, graph: Graph,
                      blueprint: WorkflowBlueprint, job: JobPayload, owner: str,
                      data: dict[str, Any], marker: Mapping[str, Any]) -> None:
        coordination = self.coordination
        assert coordination is not None
        done = await coordination.join_members(done_key(job.run_id, job.node_id, job.iteration))
        chunks = int(marker["chunks"])
        if len(done) >= chunks:
            await self._finish(context, graph, blueprint, job, owner, data, marker)
            return
        await context.release(job.node_id, owner, attempts=attempts(data, job.node_id) - 1)
        missing = [index for index in range(chunks) if str(index) not in done]
        logger.info("run %s node %s: map running, %d of %d chunks done; sending the rest",
                    job.run_id, job.node_id, chunks - len(missing), chunks)
        await self._send(job, missing[:1] if marker.get("wave") else missing)

    async def _send(self, job: JobPayload, indexes: Iterable[int]) -> None:
        trace = inject()
        jobs = [JobPayload(job.run_id, job.blueprint_id, job.node_id, job.iteration,
                           trace=trace, chunk=index) for index in indexes]
        if jobs:
            await self.algorithm.backend.queue.send(jobs, 0)

    # ==========================================================================================
    # A chunk's job
    # ==========================================================================================

    async def run_chunk(self, job: JobPayload, blueprint: WorkflowBlueprint, base_graph: Graph,
                        ) -> tuple[JobOutcome, float]:
        """Run one chunk's job (the module docstring); returns its outcome."""
        assert job.chunk is not None
        algorithm = self.algorithm
        data = await run_context(algorithm.backend.runs, job.run_id).load()
        if data is None:
            logger.error("run %s node %s: chunk %d names a run with no stored context; "
                         "dropped", job.run_id, job.node_id, job.chunk)
            return "dropped", 0.0
        refused = algorithm.finisher.refusal(job, blueprint, data)
        if refused is not None:
            return refused
        marker = marker_of(data, job.node_id, job.iteration)
        if marker is None or job.chunk >= int(marker["chunks"]) or self.coordination is None:
            if resolution_count(data, job.node_id) > job.iteration:
                # The map finished: a crash may have cut off what follows the scatter.
                await self._reannounce(job, blueprint, base_graph, data)
                return "duplicate", 0.0
            logger.info("run %s node %s: chunk %d is of no running map; dropped",
                        job.run_id, job.node_id, job.chunk)
            return "dropped", 0.0
        chunk = self._chunk(job, marker, job.chunk)
        owner = algorithm.lease_owner()
        settings = algorithm.settings
        claim = await chunk.claim(CHUNK_NODE, 0, owner, settings.lease_seconds)
        if claim.status is ClaimStatus.MISSING:
            logger.error("run %s node %s: chunk %d is not stored; dropped", job.run_id,
                         job.node_id, job.chunk)
            return "dropped", 0.0
        if claim.status is ClaimStatus.LOCKED:
            return "deferred", max(1.0, (claim.expires or time.time()) - time.time())
        if claim.status is ClaimStatus.DONE:
            return await self._counted(job, blueprint, base_graph, marker, "duplicate")
        assert claim.data is not None
        started = attempts(claim.data, CHUNK_NODE)
        stored_failure = claim.data.get(FAILURE_KEY)
        if isinstance(stored_failure, Mapping):
            # Failed before, but the scatter could not be failed then: fail it now.
            await chunk.release(CHUNK_NODE, owner, attempts=started - 1)
            return await self._fail(job, blueprint, base_graph,
                                    str(stored_failure.get("message")),
                                    dict(stored_failure.get("error") or {}))
        if started > settings.max_receive_count:
            reason = (f"chunk {job.chunk} of its map was attempted {started} times without "
                      f"finishing (limit {settings.max_receive_count})")
            return await self._record_failure(job, blueprint, base_graph, chunk, owner,
                                              reason, {"nodeId": job.node_id, "message": reason,
                                                       "attempt": started,
                                                       "errorType": "PoisonMessage",
                                                       "runId": job.run_id})
        graph = graph_for(base_graph, data)
        cancelled = CancellationSignal()
        renewer = asyncio.get_running_loop().create_task(
            keep_lease(chunk, CHUNK_NODE, owner, settings.lease_seconds))
        try:
            results, writes, failure = await self._run_items(job, graph, data, marker,
                                                             claim.data, cancelled)
        except BaseException as exc:
            renewer.cancel()
            left = (started - 1 if isinstance(exc, asyncio.CancelledError) else None)
            await asyncio.shield(chunk.release(CHUNK_NODE, owner, attempts=left))
            raise
        finally:
            renewer.cancel()
        if failure is not None:
            return await self._record_failure(job, blueprint, base_graph, chunk, owner,
                                              *failure)
        record = {**completed_record(0, [], None), "by": owner_token(owner),
                  "t": round(time.time(), 6)}
        operations = [PatchOperation("set", "results", results),
                      PatchOperation("set", record_key(CHUNK_NODE), record)]
        if writes:
            operations.append(PatchOperation("set", "writes", writes))
        await algorithm.checkpoint("chunk_before_commit", job)
        try:
            # Through the finisher: a commit whose answer was lost is read back.
            committed = await algorithm.finisher.commit(
                chunk, self._chunk_job(job, chunk), owner, operations)
        except (ContextTooLargeError, UnstorableValueError) as exc:
            return await self._record_failure(job, blueprint, base_graph, chunk, owner,
                                              exc.message, result_error(job, exc))
        if committed is None:
            logger.warning("run %s node %s: lease on chunk %d lost before its commit; this "
                           "result is discarded", job.run_id, job.node_id, job.chunk)
            return "processed", 0.0
        await algorithm.checkpoint("chunk_after_commit", job)
        await algorithm.finisher.touch_status(job.run_id, job.blueprint_id)
        return await self._counted(job, blueprint, base_graph, marker, "processed")

    async def _run_items(
        self, job: JobPayload, graph: Graph, data: dict[str, Any], marker: Mapping[str, Any],
        chunk: Mapping[str, Any], cancelled: CancellationSignal,
    ) -> tuple[list[Any], list[list[Any]], tuple[str, dict[str, Any]] | None]:
        """Run the chunk's items: their results and context writes, and the first failure
        (its message and error record), if one failed."""
        from .services import WorkerServices

        algorithm = self.algorithm
        items = list(chunk.get("items") or [])
        first = int(chunk.get("start") or 0)
        results: list[Any] = [None] * len(items)
        writes: list[list[Any]] = []
        failures: list[tuple[str, dict[str, Any]]] = []
        semaphore = asyncio.Semaphore(max(1, algorithm.settings.concurrency))

        async def one(offset: int, item: Any) -> None:
            async with semaphore:
                if failures:
                    return  # the map has failed: the rest need not run
                node = NodeDefinition(id=worker_node_id(job.node_id, first + offset),
                                      uses=str(marker["uses"]))
                tracked = TrackedContext(dict(data))
                await algorithm.emit("node:start", runId=job.run_id, nodeId=node.id, input=item)
                began = time.perf_counter()
                outcome = await algorithm.engine.run_node(
                    graph, node, tracked, item, run_id=job.run_id, iteration=0,
                    services=WorkerServices(algorithm.engine), signal=cancelled)
                if outcome.error is not None:
                    get_metrics().node_finished("failed", time.perf_counter() - began)
                    failures.append((outcome.error.message, outcome.error.to_dict()))
                    return
                try:
                    if outcome.awaiting is not None or outcome.result is None:
                        raise FlowcraftError("a map's worker cannot wait for a resume",
                                             node_id=node.id)
                    check_storable(outcome.result.output, f"output of node '{node.id}'")
                except FlowcraftError as exc:
                    # What a rerun would repeat: the worker node fails once, as a node does.
                    failures.append((exc.message, {**result_error(job, exc), "nodeId": node.id}))
                    return
                get_metrics().node_finished("completed", time.perf_counter() - began)
                results[offset] = outcome.result.output
                writes.extend([op.op, op.key, op.value] for op in tracked.deltas)
                await algorithm.emit("node:finish", runId=job.run_id, nodeId=node.id,
                                     output=outcome.result.output, action=None)

        await asyncio.gather(*(one(offset, item) for offset, item in enumerate(items)))
        return results, writes, (failures[0] if failures else None)

    async def _counted(self, job: JobPayload, blueprint: WorkflowBlueprint, base_graph: Graph,
                       marker: Mapping[str, Any], outcome: JobOutcome,
                       ) -> tuple[JobOutcome, float]:
        """Count the chunk done (idempotent), send the next wave, finish the map when it
        was the last; ``deferred`` when the scatter is held by another worker."""
        assert job.chunk is not None
        coordination = self.coordination
        assert coordination is not None
        done = await coordination.join_add(done_key(job.run_id, job.node_id, job.iteration),
                                           str(job.chunk), COORDINATION_TTL_SECONDS)
        chunks = int(marker["chunks"])
        if marker.get("wave") and job.chunk + 1 < chunks:
            await self._send(job, [job.chunk + 1])
        if done < chunks:
            return outcome, 0.0
        return await self._complete(job, blueprint, base_graph, outcome)

    # ==========================================================================================
    # Finishing, failing
    # ==========================================================================================

    async def _complete(self, job: JobPayload, blueprint: WorkflowBlueprint, base_graph: Graph,
                        outcome: JobOutcome) -> tuple[JobOutcome, float]:
        scatter, context, owner, claim = await self._claim_scatter(job)
        if claim.status is ClaimStatus.LOCKED:
            # Held by the scatter's own job, which finishes the map itself, or by a worker
            # that died finishing it: this job comes back to finish it after the lease.
            return "deferred", max(1.0, (claim.expires or time.time()) - time.time())
        if claim.status is ClaimStatus.DONE and claim.data is not None:
            # Finished already: a crash may have cut off what follows the scatter.
            await self._reannounce(job, blueprint, base_graph, claim.data)
            return outcome, 0.0
        if claim.status is not ClaimStatus.CLAIMED or claim.data is None:
            return outcome, 0.0
        data = claim.data
        marker = marker_of(data, job.node_id, job.iteration)
        if marker is None:
            await context.release(job.node_id, owner)
            return outcome, 0.0
        graph = graph_for(base_graph, data)
        await self._finish(context, graph, blueprint, scatter, owner, data, marker)
        return outcome, 0.0

    async def _finish(self, context: DistributedContext, graph: Graph,
                      blueprint: WorkflowBlueprint, job: JobPayload, owner: str,
                      data: dict[str, Any], marker: Mapping[str, Any]) -> None:
        """Commit the scatter (claimed by ``owner``) with the map's results, in order."""
        # Reading many chunks can take longer than a short lease: keep it until the commit.
        renewer = asyncio.get_running_loop().create_task(keep_lease(
            context, job.node_id, owner, self.algorithm.settings.lease_seconds))
        try:
            await self._finish_claimed(context, graph, blueprint, job, owner, data, marker)
        finally:
            renewer.cancel()

    async def _finish_claimed(self, context: DistributedContext, graph: Graph,
                              blueprint: WorkflowBlueprint, job: JobPayload, owner: str,
                              data: dict[str, Any], marker: Mapping[str, Any]) -> None:
        chunks = await bounded(lambda index: self._chunk(job, marker, index).load(),
                               range(int(marker["chunks"])))
        results: list[Any] = []
        operations: list[PatchOperation] = []
        for index, stored in enumerate(chunks):
            if stored is None or not isinstance(stored.get("results"), list):
                logger.error("run %s node %s: chunk %d of the map has no results; the map "
                             "cannot finish", job.run_id, job.node_id, index)
                await context.release(job.node_id, owner)
                return
            results.extend(stored["results"])
            operations.extend(PatchOperation(op, key, value)
                              for op, key, value in stored.get("writes") or ())
        tracked = TrackedContext(data)
        for operation in operations:
            if operation.op == "set":
                tracked.set_now(operation.key, operation.value)
            else:
                tracked.delete_now(operation.key)
        tracked.delete_now(map_key(job.node_id))
        output = {"gatherNodeId": marker.get("gather"), "ledger": True,
                  "count": len(results), LEDGER_RESULTS: results}
        logger.info("run %s node %s: map of %d items done", job.run_id, job.node_id,
                    len(results))
        await self.algorithm.commit_success(
            context, graph, blueprint, job, owner, tracked, list(tracked.deltas),
            NodeResult(output=output), None, continue_locally=False)

    async def _record_failure(self, job: JobPayload, blueprint: WorkflowBlueprint,
                              base_graph: Graph, chunk: DistributedContext, owner: str,
                              message: str, error: dict[str, Any]) -> tuple[JobOutcome, float]:
        """An item failed (or the chunk is poison): keep the failure on the chunk's item,
        under the chunk's lease — a lost lease means another worker runs the chunk, and
        this failure is not the map's — then fail the scatter."""
        failure = {"message": message, "error": error}
        if await chunk.commit(CHUNK_NODE, 0, owner,
                              [PatchOperation("set", FAILURE_KEY, failure)]) is None:
            logger.warning("run %s node %s: lease on chunk %s lost; its failure (%s) is left "
                           "to the worker that took it over", job.run_id, job.node_id,
                           job.chunk, message)
            return "processed", 0.0
        return await self._fail(job, blueprint, base_graph, message, error)

    async def _fail(self, job: JobPayload, blueprint: WorkflowBlueprint, base_graph: Graph,
                    message: str, error: dict[str, Any]) -> tuple[JobOutcome, float]:
        """A map's item failed: fail the scatter with its error, and so the run. While the
        scatter is held (its own job finishing or resending chunks), come back later."""
        reason = f"map worker '{error.get('nodeId')}' failed: {message}"
        error = {**error, "nodeId": job.node_id, "message": reason}
        scatter, context, owner, claim = await self._claim_scatter(job)
        if claim.status is ClaimStatus.LOCKED:
            return "deferred", max(1.0, (claim.expires or time.time()) - time.time())
        if claim.status is not ClaimStatus.CLAIMED or claim.data is None:
            return "dropped", 0.0  # no run, or the scatter resolved meanwhile
        run_state = claim.data.get(RUN_STATE_KEY)
        if isinstance(run_state, Mapping) and run_state.get("status") in FINAL_STATUSES:
            await context.release(job.node_id, owner)  # cancelled or failed: it stays so
            return "dropped", 0.0
        graph = graph_for(base_graph, claim.data)
        await self.algorithm.finisher.fail_node(context, graph, scatter, owner, [], reason,
                                                error)
        return "processed", 0.0

    async def _claim_scatter(self, job: JobPayload,
                             ) -> tuple[JobPayload, DistributedContext, str, Claim]:
        """Claim the scatter of a chunk's job (not counted as an attempt): its own job, its
        run's context, the lease owner and the claim."""
        algorithm = self.algorithm
        scatter = JobPayload(job.run_id, job.blueprint_id, job.node_id, job.iteration,
                             trace=job.trace)
        context = run_context(algorithm.backend.runs, job.run_id)
        owner = algorithm.lease_owner()
        claim = await context.claim(job.node_id, job.iteration, owner,
                                    algorithm.settings.lease_seconds, count_attempt=False)
        return scatter, context, owner, claim

    async def _reannounce(self, job: JobPayload, blueprint: WorkflowBlueprint,
                          base_graph: Graph, data: dict[str, Any]) -> None:
        """Send what follows the (finished) scatter again, as a redelivered node's job does."""
        context = run_context(self.algorithm.backend.runs, job.run_id)
        await self.algorithm._advance_and_enqueue(
            context, graph_for(base_graph, data), blueprint, [job.node_id], data)

    def _chunk_job(self, job: JobPayload, chunk: DistributedContext) -> JobPayload:
        """The chunk's own node as a job, for the finisher's commit."""
        return JobPayload(chunk.run_id, job.blueprint_id, CHUNK_NODE, 0)
