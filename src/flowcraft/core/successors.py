"""What follows a finished node: the one decision every engine makes the same way.

When a node resolves (completes, or is skipped), each of its successors either
**runs** (a job is started, at the successor's next generation), is
**skipped** (no predecessor will deliver to it: it resolves without running,
and the skip propagates), or **waits** (a join still expects a predecessor).
:func:`decide` makes that decision for the successors of a set of resolved
nodes, from the routing records in the context alone
(:mod:`flowcraft.core.routing`); :func:`frontier` makes it for a whole run
from its stored records (after a crash, for a resume, to tell whether a run
has finished). There is no other successor logic: the in-memory runtime and
the distributed job algorithm both call these two functions and only apply
what they return — the runtime writes skip records into its dict, a worker
writes them with one conditional write and decides again from the context
that write returns.

The rules, for a successor ``T`` of a resolved node ``S``:

* **Back edges** (a loop coming round): ``T`` runs when ``S`` took the edge in
  the iteration ``T`` last ran.
* **Resolved already.** A node outside every cycle resolves once. It is
  decided again only when it was *skipped* and a predecessor now delivers to it
  (a loop's exit taken on a later iteration revives what earlier iterations
  skipped). A node on a cycle is decided again only when the loop comes round
  to it: a fresh delivery over its back edge, or a predecessor on the same
  cycle that resolved after it. (A predecessor outside the cycle resolved once,
  before the loop; it cannot start another iteration.)
* **Joins** (:func:`join_decision`): with ``all``, wait until every forward
  predecessor resolved, then run if any delivered, else skip; with ``any``, run
  on the first delivery, skip once all resolved without one. A predecessor
  *resolved* for ``T``'s pending run when its record is newer than ``T``'s
  (same cycle) or exists at all (outside ``T``'s cycle); it *delivered* when it
  completed and took an edge to ``T``.

Engines that must arbitrate between concurrent predecessors do so on top of
this decision: a worker's ``any`` join is started by the predecessor that
wins a set-if-absent in the coordination store.

A :class:`JoinTally` lets an engine whose sources have *just* resolved (the
in-memory runtime) count join arrivals incrementally instead of re-deriving
them from every predecessor's record: a 10,000-way fan-in then costs O(1) per
arrival. Without one, joins are evaluated from the records, which is what a
worker needs (its sources may be re-announced by a duplicate delivery).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .graph import Graph
from .routing import (
    AWAITING_IDS_KEY,
    NodeRecord,
    deliveries,
    fresh_record,
    read_record,
    resolution_count,
)

__all__ = [
    "JoinDecision",
    "JoinTally",
    "Ready",
    "Successors",
    "decide",
    "evaluate",
    "frontier",
    "join_arrivals",
    "join_decision",
]


class JoinDecision(enum.Enum):
    WAIT = "wait"
    RUN = "run"
    SKIP = "skip"


def join_decision(strategy: str, expected: int, resolved: int, delivered: int) -> JoinDecision:
    """The join rule (see the module docstring)."""
    if strategy == "any":
        if delivered > 0:
            return JoinDecision.RUN
        return JoinDecision.SKIP if resolved >= expected else JoinDecision.WAIT
    if resolved < expected:
        return JoinDecision.WAIT
    return JoinDecision.RUN if delivered > 0 else JoinDecision.SKIP


@dataclass(frozen=True, slots=True)
class Ready:
    """A successor that runs now."""

    node_id: str
    generation: int
    """The generation it runs at: how often it has resolved so far."""
    source: str
    """The resolved node whose arrival made it ready."""
    delivered: bool
    """Whether ``source`` delivered to it (an ``any`` join's first arrival)."""
    wake_up_at: float | None = None
    """When ``source``'s durable sleep ends, if it slept."""
    certain: bool = False
    """``source`` is its only way in and it has not resolved outside a loop: nothing another
    predecessor does can change this decision (a worker may claim it in the same write)."""


class Successors:
    """The decision for the successors of some resolved nodes.

    The successors that run are kept column by column (``ready_ids``, ``ready_sources``,
    ...), so a 10,000-way fan-out costs no object per successor; :attr:`ready` gives them as
    :class:`Ready` entries."""

    __slots__ = ("_ready", "certain_skips", "ready_certain", "ready_delivered",
                 "ready_generations", "ready_ids", "ready_sources", "ready_wakes", "skip")

    def __init__(self) -> None:
        self.ready_ids: list[str] = []
        self.ready_generations: list[int] = []
        self.ready_sources: list[str] = []
        self.ready_delivered: list[bool] = []
        self.ready_wakes: list[float | None] = []
        self.ready_certain: list[bool] = []
        self.skip: list[str] = []
        """Successors to skip now, in order; each skip resolves them for their own
        successors."""
        self.certain_skips: list[str] = []
        """The skips whose only way in is a source that just resolved (no other predecessor
        can change them): a worker writes them with the source's own commit."""
        self._ready: list[Ready] | None = None

    def add_ready(self, node_id: str, generation: int, source: str, delivered: bool,
                  wake_up_at: float | None, certain: bool) -> None:
        self.ready_ids.append(node_id)
        self.ready_generations.append(generation)
        self.ready_sources.append(source)
        self.ready_delivered.append(delivered)
        self.ready_wakes.append(wake_up_at)
        self.ready_certain.append(certain)
        self._ready = None

    @property
    def ready(self) -> list[Ready]:
        """The successors that run now, in order."""
        if self._ready is None:
            self._ready = [Ready(*row) for row in zip(
                self.ready_ids, self.ready_generations, self.ready_sources,
                self.ready_delivered, self.ready_wakes, self.ready_certain, strict=True)]
        return self._ready


class JoinTally:
    """Join arrivals counted as they happen (see the module docstring): per pending run of
    a join, the predecessors that resolved for it and those that delivered."""

    __slots__ = ("_arrivals",)

    def __init__(self) -> None:
        self._arrivals: dict[tuple[str, int], tuple[set[str], set[str]]] = {}

    def arrive(self, graph: Graph, data: Mapping[str, Any], source: str, target: str,
               generation: int, delivered: bool) -> JoinDecision:
        key = (target, generation)
        arrivals = self._arrivals.get(key)
        if arrivals is None:
            # Derived once from the records (which may already hold predecessors whose own
            # arrival is still to come); later arrivals add themselves. Sets, so a source is
            # never counted twice.
            arrivals = self._arrivals[key] = join_arrivals(graph, data, target)
        arrivals[0].add(source)
        if delivered:
            arrivals[1].add(source)
        expected = len(graph.forward_predecessors.get(target, ()))
        return join_decision(graph.nodes[target].join_strategy, expected, len(arrivals[0]),
                             len(arrivals[1]))


def join_arrivals(graph: Graph, data: Mapping[str, Any], target: str) -> tuple[set[str], set[str]]:
    """The forward predecessors that resolved for ``target``'s pending run, and those of them
    that delivered to it, from the records in ``data``."""
    target_count = resolution_count(data, target)
    resolved: set[str] = set()
    delivered: set[str] = set()
    for source in graph.forward_predecessors.get(target, ()):
        record = fresh_record(graph, data, source, target, target_count, back=False)
        if record is None:
            continue
        resolved.add(source)
        if record.delivered_to(graph, source, target) is not None:
            delivered.add(source)
    return resolved, delivered


def _settled(graph: Graph, data: Mapping[str, Any], target: str, record: NodeRecord,
             delivered_now: bool | None) -> bool:
    """Whether ``target``, which has resolved before, stays as it is (the second rule of the
    module docstring). ``delivered_now``: whether the arriving source delivered to it
    (``None``: no particular source; any predecessor that delivers counts)."""
    if graph.same_cycle(target, target):
        if any(d.back for d in deliveries(graph, data, target)):
            return False
        return not any(
            graph.same_cycle(source, target) and resolution_count(data, source) > record.count
            for source in graph.forward_predecessors.get(target, ())
        )
    if not record.skipped:
        return True
    if delivered_now is None:
        return not deliveries(graph, data, target)
    return not delivered_now


def evaluate(graph: Graph, data: Mapping[str, Any], target: str) -> JoinDecision:
    """The decision for ``target``'s pending run from all its predecessors' records."""
    record = read_record(data, target)
    if record is not None and _settled(graph, data, target, record, None):
        return JoinDecision.WAIT
    resolved, delivered = join_arrivals(graph, data, target)
    expected = len(graph.forward_predecessors.get(target, ()))
    return join_decision(graph.nodes[target].join_strategy, expected, len(resolved),
                         len(delivered))


def decide(graph: Graph, data: Mapping[str, Any], sources: Iterable[str],
           tally: JoinTally | None = None) -> Successors:
    """The successors of ``sources`` (nodes that resolved) that run now or are skipped now.

    One round: the caller writes the skip records and calls again with the skipped nodes as
    sources, so skipping propagates (a worker decides that next round from the context its
    write returned). With ``tally``, every source must have resolved just now.
    """
    decision: Successors | None = None  # made on the first decision: most arrivals wait
    if not isinstance(sources, list) or len(sources) > 1:
        sources = dict.fromkeys(sources)
    outgoing = graph.outgoing
    back_edges = graph.back_edges
    predecessors = graph.forward_predecessors
    for source in sources:
        record = read_record(data, source)
        if record is None or record.failed:
            continue  # a failed node never resolves: what needed it never runs
        edges = outgoing.get(source, ())
        if not edges:
            continue
        taken = record.taken
        only: str | None = None  # the one target delivered to, or
        delivered: frozenset[str] | set[str] = frozenset()  # all of them
        if record.skipped:
            pass
        elif len(taken) == 1:
            only = edges[taken[0]].target
        else:
            delivered = {edges[i].target for i in taken}
        targets = (edges[0].target,) if len(edges) == 1 else dict.fromkeys(
            e.target for e in edges)
        for target in targets:
            hit = target == only or target in delivered
            if (source, target) in back_edges:
                count = resolution_count(data, target)
                if hit and fresh_record(graph, data, source, target, count, True) is not None:
                    decision = decision or Successors()
                    decision.add_ready(target, count, source, True, record.wake_up_at, True)
                continue
            target_record = read_record(data, target)
            if target_record is not None and _settled(graph, data, target, target_record, hit):
                continue
            count = target_record.count if target_record is not None else 0
            only_way_in = predecessors.get(target) == (source,)
            if tally is not None and only_way_in:
                verdict = JoinDecision.RUN if hit else JoinDecision.SKIP
            elif tally is not None:
                verdict = tally.arrive(graph, data, source, target, count, hit)
            else:
                resolved, arrived = join_arrivals(graph, data, target)
                verdict = join_decision(graph.nodes[target].join_strategy,
                                        len(predecessors.get(target, ())),
                                        len(resolved), len(arrived))
            if verdict is JoinDecision.WAIT:
                continue
            decision = decision or Successors()
            if verdict is JoinDecision.RUN:
                certain = only_way_in and (target_record is None
                                           or graph.same_cycle(target, target))
                decision.add_ready(target, count, source, hit, record.wake_up_at, certain)
            elif target not in decision.skip:
                decision.skip.append(target)
                if only_way_in and target_record is None:
                    decision.certain_skips.append(target)
    return decision or _NOTHING


_NOTHING = Successors()
"""What :func:`decide` returns when nothing follows yet (shared: never changed)."""


def frontier(graph: Graph, data: Mapping[str, Any]) -> Successors:
    """What can run, and what is to be skipped, in a run as its records stand: the start
    nodes that never ran, and :func:`decide` over every resolved node.

    Used to continue after a crash (what a lost message would have started), to resume a
    run, and to tell whether a run has finished (nothing can run). Nodes that are awaiting
    (they wait for ``resume``) and fallback-only nodes are left out; nodes whose jobs are
    running are in it (a worker filters them by their leases).
    """
    awaiting = set(data.get(AWAITING_IDS_KEY) or ())
    left_out = awaiting | graph.fallback_only
    resolved = [node_id for node_id in graph.nodes if read_record(data, node_id) is not None]
    decision = decide(graph, data, resolved)
    result = Successors()
    seen: set[str] = set()
    for node_id in graph.start_node_ids:
        if (not graph.forward_predecessors.get(node_id) and read_record(data, node_id) is None
                and node_id not in left_out):
            seen.add(node_id)
            result.add_ready(node_id, 0, node_id, False, None, False)
    for entry in decision.ready:
        if entry.node_id not in seen and entry.node_id not in left_out:
            seen.add(entry.node_id)
            result.add_ready(entry.node_id, entry.generation, entry.source, entry.delivered,
                             entry.wake_up_at, entry.certain)
    result.skip = [n for n in decision.skip if n not in left_out]
    result.certain_skips = [n for n in decision.certain_skips if n in result.skip]
    return result
