"""Copies of runs as this worker last committed to them, so a claim need not read back.

A claim returns the run's context because the node works on it. But a worker that has
just committed a node of a run holds a copy of that run already — the run as its claim
returned it plus its own commit — and the next jobs it takes are often that run's again:
a fan-out's branches, a join's predecessors. :class:`RunSnapshots` keeps such a copy per
run (the most recent runs only), and :meth:`RunSnapshots.covering` hands it to the
claim (``claim(..., base=copy)``), which then writes the lease without reading the run
back (on DynamoDB, ``ReturnValues`` ``UPDATED_NEW``: the lease and the attempt count).

When is a copy good enough? The node must see everything it depends on: the writes of
the nodes that delivered to it, and of those before them. A commit writes a node's
output, context writes and record in one atomic write, and the copy is made of atomic
images of the run (a claim's answer) plus this worker's own commits; so if the copy holds
the records that make the node ready (:func:`~flowcraft.core.successors.evaluate` says
``RUN`` from the copy alone), it holds everything those predecessors wrote. What it may
miss is what unrelated branches wrote since — which the node could not rely on anyway,
as those branches might just as well have run later. Nodes in loops, a run that has
ended (as far as the copy knows), a node the copy shows resolved or awaiting, and an
``any`` join (its input is its first arrival, which the coordination store names and the
copy may not hold) are claimed the ordinary way. The store itself refuses to answer from
the copy when the run has ended or the node is parked or running a map — states a node
reaches without a record, which a copy made earlier cannot show — and any claim it
refuses (those, another worker holding the node, a duplicate) is made again the ordinary
way, which tells why.

Copies are plain JSON, cloned when kept and when handed out: a running node changes its
own working copy, never the kept one. A commit that goes on with its next node in this worker
and sends no job (a chain) keeps no copy: no claim of that run is coming this worker's
way, and its next commit will keep one if one is.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ..context import deep_copy_json
from ..core.graph import Graph, graph_for
from ..core.routing import AWAITING_IDS_KEY, read_record
from ..core.successors import JoinDecision, evaluate
from .context import RUN_STATE_KEY
from .job import JobPayload

RUNS_KEPT = 32
"""How many runs' copies a worker keeps (the most recently committed to)."""


class RunSnapshots:
    """The last copy of each of the ``limit`` runs this worker committed to most recently."""

    def __init__(self, limit: int = RUNS_KEPT) -> None:
        self.limit = limit
        self._runs: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def keep(self, run_id: str, data: Mapping[str, Any]) -> None:
        """Keep a copy of ``data``, the run as a commit of this worker answered it."""
        if RUN_STATE_KEY in data:
            self._runs.pop(run_id, None)  # ended: every later claim reads it anyway
            return
        self._runs[run_id] = deep_copy_json(dict(data))
        self._runs.move_to_end(run_id)
        while len(self._runs) > self.limit:
            self._runs.popitem(last=False)

    def covering(self, job: JobPayload, base_graph: Graph) -> dict[str, Any] | None:
        """A copy of the run for ``job``'s claim, if the kept one holds everything its node
        depends on (see the module docstring); else ``None``."""
        kept = self._runs.get(job.run_id)
        if kept is None:
            return None
        graph = graph_for(base_graph, kept)
        node_id = job.node_id
        if (job.iteration != 0 or node_id not in graph.nodes or node_id in graph.repeatable
                or (graph.nodes[node_id].join_strategy == "any"
                    and len(graph.forward_predecessors.get(node_id, ())) > 1)
                or read_record(kept, node_id) is not None
                or node_id in (kept.get(AWAITING_IDS_KEY) or ())
                or evaluate(graph, kept, node_id) is not JoinDecision.RUN):
            return None
        self._runs.move_to_end(job.run_id)
        copy: dict[str, Any] = deep_copy_json(kept)
        return copy
