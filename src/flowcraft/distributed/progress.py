"""What follows a commit: successors, skips, continuation and the end of a run.

Steps 5 (the skips and the continuation that ride along in a commit), 6
(advance) and 8 (completion) of the job algorithm (:mod:`.algorithm`). Every
decision comes from :mod:`flowcraft.core.successors` — the one successor
logic, which the in-memory runtime uses too — applied to the context a write
returned; this module only carries the decisions out:

* :func:`commit_plan` — what a commit can decide by itself: the skips whose only
  way in is the committing node (their records go into the same write), and the
  successors certain to be ready after it, of which the committing worker claims
  in that write the first (it runs next: local continuation) and as many more as it
  has free job slots for (:mod:`.slots`);
* :meth:`Progress.advance` — the rest: ``decide`` from the committed context;
  skips written (one patch per round, whose returned context feeds the next
  round, so a join decided by a skip sees every predecessor that committed
  meanwhile); the nodes to start returned. An ``any`` join takes its first
  arrival through the coordination store (:meth:`Progress.wins_any_join`);
* :meth:`Progress.maybe_complete` — the status record set ``completed`` (or
  ``awaiting``) once ``frontier`` finds nothing else that can run;
* :func:`job_misfit` and :func:`wake_up_at` — whether a job fits the run as
  stored, and when the durable sleeps before a node end.

Everything here reads the run's context as given; the only writes are the skip
patches of :meth:`Progress.advance`, the first arrival at an ``any`` join (in the
coordination store) and the status record of :meth:`Progress.maybe_complete`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..context import PatchOperation
from ..core.graph import Graph, terminal_ids
from ..core.routing import (
    AWAITING_IDS_KEY,
    deliveries,
    read_record,
    record_key,
    resolution_count,
    skipped_record,
)
from ..core.successors import JoinDecision, decide, evaluate, frontier
from ..observability import get_metrics
from .backend import Backend, now_iso
from .context import (
    RUN_STATE_KEY,
    DistributedContext,
    arrivals_key,
    live_lease,
    lock_key,
    owner_token,
)
from .coordination import COORDINATION_TTL_SECONDS, CoordinationStore, any_key
from .job import JobPayload

logger = logging.getLogger("flowcraft.distributed")


class Emit(Protocol):
    """Publish one event (``await emit("node:skipped", runId=..., nodeId=...)``)."""

    def __call__(self, event_type: str, **payload: Any) -> Awaitable[None]: ...


@dataclass
class Advance:
    """What :meth:`Progress.advance` decided: the nodes to start (node, generation, when
    the sleep before it ends) and the freshest context."""

    ready: list[tuple[str, int, float | None]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Advance and completion of runs over a backend's status store, the coordination
    store (``any`` joins) and an event publisher."""

    def __init__(self, backend: Backend, coordination_store: CoordinationStore,
                 emit: Emit) -> None:
        self.backend = backend
        self.coordination_store = coordination_store
        self.emit = emit

    async def advance(
        self, context: DistributedContext, graph: Graph, sources: Sequence[str],
        data: dict[str, Any], *, continued: Sequence[tuple[str, int]] = (),
    ) -> Advance:
        """Decide every successor of ``sources`` from ``data`` (the context our write returned).

        Skips are written (one patch per round, whose returned context feeds the next
        round) and propagate. Returns the nodes to start and the freshest context.
        """
        run_id = context.run_id
        ready: dict[tuple[str, int], float | None] = {}
        now = time.time()
        pending = list(dict.fromkeys(sources))
        while pending:
            decision = decide(graph, data, pending)
            for entry in decision.ready:
                if await self.wins_any_join(graph, run_id, entry.source, entry.node_id,
                                            entry.generation, entry.delivered):
                    ready[(entry.node_id, entry.generation)] = entry.wake_up_at
            if not decision.skip:
                break
            operations = [
                PatchOperation("set", record_key(t), skipped_record(resolution_count(data, t)))
                for t in decision.skip
            ]
            fresh = await context.apply(operations)
            data = fresh if fresh is not None else data
            for skipped in decision.skip:
                logger.debug("run %s node %s: skipped", run_id, skipped)
                await self.emit("node:skipped", runId=run_id, nodeId=skipped)
            pending = decision.skip
        awaiting = set(data.get(AWAITING_IDS_KEY) or ())
        startable = [
            (node_id, generation, wake)
            for (node_id, generation), wake in ready.items()
            if (node_id, generation) in continued
            or (
                resolution_count(data, node_id) <= generation
                and not live_lease(data, node_id, now)
                and node_id not in awaiting
            )
        ]
        await self.maybe_complete(run_id, graph, data)
        return Advance(startable, data)

    async def wins_any_join(self, graph: Graph, run_id: str, source: str, target: str,
                            generation: int, delivered: bool) -> bool:
        node = graph.nodes[target]
        if node.join_strategy != "any" or len(graph.forward_predecessors.get(target, ())) <= 1:
            return True
        key = any_key(run_id, target, generation)
        if not delivered:
            # Decided by another predecessor's arrival; it holds the first-arrival key.
            return await self.coordination_store.get(key) is None
        if await self.coordination_store.set_if_not_exist(key, source, COORDINATION_TTL_SECONDS):
            return True
        return await self.coordination_store.get(key) == source

    async def maybe_complete(self, run_id: str, graph: Graph, data: Mapping[str, Any]) -> None:
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
        statuses = self.backend.statuses
        if awaiting:
            await statuses.write(run_id, {"status": "awaiting", "lastUpdated": now_iso(),
                                          "awaitingNodeIds": awaiting},
                                 only_if_running=True)
            return
        if await statuses.write(run_id, {"status": "completed", "finalStatus": "completed",
                                         "lastUpdated": now_iso()}, only_if_running=True):
            logger.info("run %s completed", run_id)
            get_metrics().run_finished("completed")
            await self.emit("workflow:finish", runId=run_id, status="completed")


def commit_plan(graph: Graph, node_id: str,
                working: dict[str, Any]) -> tuple[list[str], list[tuple[str, int]]]:
    """What the commit of ``node_id`` (whose record is in ``working``) decides by itself: the
    skips no other predecessor can change — successors whose only way in is this node or a
    node skipped with it, in order — and the successors certain to be ready after it, as
    (node, generation), in order."""
    first = decide(graph, working, [node_id])
    skips: list[str] = []
    sources = first.certain_skips
    while sources:
        for target in sources:  # provisional, so the next round sees them resolved
            working[record_key(target)] = skipped_record(resolution_count(working, target))
        skips += sources
        sources = [t for t in decide(graph, working, sources).certain_skips if t not in skips]
    for skipped in skips:
        working.pop(record_key(skipped), None)
    return skips, [(r.node_id, r.generation) for r in first.ready if r.certain]


def arrivals(graph: Graph, node_id: str) -> dict[str, int]:
    """What the completion of ``node_id`` adds to the arrival counts of the ``all`` joins it
    leads to (:func:`~flowcraft.distributed.context.arrivals_key`). Every completion counts,
    whatever the graph: a join counted in a run's graph as stored before nodes were added
    (:attr:`~flowcraft.core.graph.Graph.counted_joins`) then still reaches its count."""
    predecessors = graph.forward_predecessors
    return {arrivals_key(target): 1 for target in graph.forward_successors(node_id)
            if len(predecessors.get(target, ())) > 1
            and graph.nodes[target].join_strategy == "all"}


def decided_alone(graph: Graph, node_id: str, skips: Sequence[str],
                  successors: Sequence[tuple[str, int]]) -> bool:
    """Whether what follows the commit of ``node_id`` can be decided without the run as others
    left it: every successor is certain (:func:`commit_plan`) or a counted join, whose count
    the commit returns (the last arrival reads the run: :func:`last_arrival`), and the run
    cannot end with this commit. The commit then need not read the run back."""
    targets = {edge.target for edge in graph.outgoing.get(node_id, ())}
    certain = {target for target, _ in successors}
    return (bool(targets) and not skips and node_id not in graph.repeatable
            and all(t in certain or t in graph.counted_joins for t in targets))


def last_arrival(graph: Graph, node_id: str, data: Mapping[str, Any]) -> bool:
    """Whether the commit that returned ``data`` completed the count of a counted join after
    ``node_id``: the join is then decided from the records, read afresh."""
    return any(
        int(data.get(arrivals_key(target)) or 0) >= len(graph.forward_predecessors[target])
        for target in graph.forward_successors(node_id) if target in graph.counted_joins)


def wake_up_at(graph: Graph, data: Mapping[str, Any], node_id: str) -> float | None:
    """When the durable sleeps that delivered to ``node_id`` end (``None``: no sleep)."""
    wakes = [record.wake_up_at for delivery in deliveries(graph, data, node_id)
             if (record := read_record(data, delivery.source)) is not None
             and record.wake_up_at is not None]
    return max(wakes) if wakes else None


def job_misfit(graph: Graph, data: Mapping[str, Any], job: JobPayload) -> str | None:
    """Why a job cannot belong to the run as stored (``None``: it fits).

    Jobs are enqueued at the generation their node is at (:func:`resolution_count`),
    which only grows: a later one was never sent. A node outside every cycle resolves
    once, unless a loop revives it from a skip (``evaluate`` decides it runs after all): a
    job for it at its current generation after it resolved would run it a second time.
    """
    if job.node_id not in graph.nodes:
        return f"node '{job.node_id}' is not in blueprint '{graph.blueprint.id}'"
    count = resolution_count(data, job.node_id)
    if job.iteration > count:
        return (f"iteration {job.iteration} is ahead of the node, which has resolved "
                f"{count} time(s)")
    if (job.iteration == count and read_record(data, job.node_id) is not None
            and not graph.same_cycle(job.node_id, job.node_id)
            and evaluate(graph, data, job.node_id) is not JoinDecision.RUN):
        return "the node has resolved already and is in no loop that could run it again"
    return None


def same_execution(graph: Graph, data: Mapping[str, Any], node_id: str) -> list[str]:
    """``node_id`` and the nodes its execution went on to commit after it, in this worker
    (local continuations and successors run in lent slots: :mod:`.slots`), found by the
    lease owner their records name. A redelivered job re-announces the successors of all
    of them: a crash after one of those commits leaves its successors with no message."""
    record = data.get(record_key(node_id))
    token = record.get("by") if isinstance(record, Mapping) else None
    region, pending = [node_id], [node_id]
    while token is not None and pending:
        for successor in graph.forward_successors(pending.pop()):
            value = data.get(record_key(successor))
            if (successor not in region and isinstance(value, Mapping)
                    and value.get("by") == token):
                region.append(successor)
                pending.append(successor)
    return region


def held_by_execution(graph: Graph, data: Mapping[str, Any], region: Sequence[str],
                      now: float, running: Container[str] = ()) -> float | None:
    """When the last live lease that ``region``'s execution holds on a successor of it ends
    (``None``: it holds none, or it is ``running`` in this worker). Such a successor was
    claimed by a commit of that execution and has no message: unless that execution is
    known to be alive, the redelivered job waits for the lease instead of going away."""
    record = data.get(record_key(region[0]))
    token = record.get("by") if isinstance(record, Mapping) else None
    if token in running:
        return None
    ends = [float(lease.get("expires", 0))
            for node in region for successor in graph.forward_successors(node)
            if isinstance(lease := data.get(lock_key(successor)), Mapping)
            and owner_token(str(lease.get("owner", ""))) == token
            and float(lease.get("expires", 0)) > now]
    return max(ends) if ends and token is not None else None
