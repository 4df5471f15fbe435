"""The graph a run executes: the blueprint, indexed, plus nodes added while running.

Edges are split into *forward* edges and *back* edges. Back edges are the
ones that close a cycle (found by a DFS from the start nodes: an edge to a
node on the current DFS path). Joins count only forward predecessors, so a
loop's entry node does not wait for the loop's own back edge; taking a back
edge starts the target's next iteration directly.

Dynamic nodes (``batch-scatter`` workers) extend the graph of one run without
touching the blueprint; :meth:`Graph.extended` returns a new graph. A node's
dynamic nodes go between it and its forward successors
(:func:`dynamic_addition`), unless one of them names, under ``follows``, nodes
listed before it in the same addition: it then runs after those, and they lead
to it instead of to the producer's successors. That is how a ``batch-scatter``
with ``chunkSize`` chains its waves: each wave's workers lead to the scatter
node of the next wave, and only the last wave's nodes lead on to the gather.
"""

from __future__ import annotations

import json
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..analysis import (
    fallback_only_node_ids,
    find_cycles,
    loop_problems,
    start_node_ids,
)
from ..blueprint import EdgeDefinition, NodeDefinition, WorkflowBlueprint
from ..errors import BlueprintValidationError, FlowcraftError
from ..nodes.base import FOLLOWS


class Graph:
    __slots__ = (
        "_base",
        "_counted_joins",
        "_edge_index",
        "_plain_fans",
        "back_edges",
        "blueprint",
        "dynamic_node_ids",
        "fallback_only",
        "forward_predecessors",
        "incoming",
        "nodes",
        "outgoing",
        "repeatable",
        "start_node_ids",
        "strongly_connected",
        "terminal_node_ids",
    )

    def __init__(self, blueprint: WorkflowBlueprint) -> None:
        problems = loop_problems(blueprint)
        if problems:
            raise BlueprintValidationError(blueprint.id, problems)
        self.blueprint = blueprint
        self.nodes: dict[str, NodeDefinition] = {node.id: node for node in blueprint.nodes}
        self.outgoing, self.incoming = _adjacency(self.nodes, {}, {}, blueprint.edges)
        self.fallback_only: set[str] = fallback_only_node_ids(blueprint)
        # Most graphs are acyclic, which a topological count tells in one pass; only a graph
        # with a cycle pays for the search that names them.
        cycles = find_cycles(blueprint) if not _acyclic(self.outgoing, self.incoming) else []
        starts = [node_id for node_id, edges in self.incoming.items()
                  if not edges and node_id not in self.fallback_only]
        self.start_node_ids: list[str] = (
            starts if starts or not self.nodes else start_node_ids(blueprint, cycles))
        self.terminal_node_ids: list[str] = [
            node_id for node_id, edges in self.outgoing.items()
            if not edges and node_id not in self.fallback_only]
        self.back_edges: set[tuple[str, str]] = (
            self._find_back_edges(self.start_node_ids) if cycles else set()
        )
        # Nodes on a common cycle: a loop body. Used to align iterations at joins.
        self.strongly_connected: dict[str, int] = (
            _strongly_connected_components(self.outgoing) if cycles else {}
        )
        self.forward_predecessors: dict[str, tuple[str, ...]] = {
            node_id: self._forward_sources(node_id) for node_id in self.incoming
        }
        self.dynamic_node_ids: tuple[str, ...] = ()
        self._edge_index: dict[str, dict[str, tuple[int, ...]]] = {}
        self.repeatable: frozenset[str] = self._repeatable()
        self._counted_joins: frozenset[str] | None = None
        self._plain_fans: dict[str, PlainFan] | None = None
        self._base: Graph | None = None  # for a graph with dynamic nodes: the blueprint's

    def _find_back_edges(self, roots: Sequence[str]) -> set[tuple[str, str]]:
        back: set[tuple[str, str]] = set()
        state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
        for root in [*roots, *self.nodes]:
            if root in state:
                continue
            state[root] = 1
            stack = [(root, iter(self.outgoing[root]))]
            while stack:
                node_id, edges = stack[-1]
                edge = next(edges, None)
                if edge is None:
                    state[node_id] = 2
                    stack.pop()
                    continue
                seen = state.get(edge.target)
                if seen == 1:
                    back.add((node_id, edge.target))
                elif seen is None:
                    state[edge.target] = 1
                    stack.append((edge.target, iter(self.outgoing[edge.target])))
        return back

    def _repeatable(self) -> frozenset[str]:
        """Nodes that may resolve more than once in a run: those on a cycle or after one."""
        found = set(self.strongly_connected)
        stack = list(found)
        while stack:
            for edge in self.outgoing[stack.pop()]:
                if edge.target not in found:
                    found.add(edge.target)
                    stack.append(edge.target)
        return frozenset(found)

    def _forward_sources(self, node_id: str) -> tuple[str, ...]:
        """The predecessors a join counts: not back edges, and not fallback-only nodes (they
        run only in another node's place, so they never arrive on their own)."""
        edges = self.incoming[node_id]
        if len(edges) <= 1 and not self.back_edges and not self.fallback_only:
            return (edges[0].source,) if edges else ()
        return tuple(dict.fromkeys(
            edge.source for edge in self.incoming[node_id]
            if (edge.source, node_id) not in self.back_edges
            and edge.source not in self.fallback_only
        ))

    @property
    def root(self) -> Graph:
        """The blueprint's graph this one extends (itself, when it has no dynamic nodes)."""
        return self._base or self

    @property
    def plain_fans(self) -> dict[str, PlainFan]:
        """Fans whose branches may be stored in items of their own
        (:mod:`flowcraft.distributed.homes`), by source id; a run stores them so when their
        source's commit wrote the marker, which it does for fans of at least
        :data:`WIDE_FAN_MIN_BRANCHES` branches.

        A source qualifies when it takes every edge to its successors (no condition or
        action, not a ``batch-scatter``, outside every loop), and every successor is a
        *branch*: a plain node (no built-in ``uses``, no fallback) whose only way in is that
        source and whose only way out is one plain edge to the same counted join
        (:attr:`counted_joins`), which has no other way in. Computed on the blueprint's
        graph: a run's dynamic nodes never change which nodes have items of their own."""
        if self._base is not None:
            return self._base.plain_fans
        if self._plain_fans is None:
            self._plain_fans = self._find_plain_fans()
        return self._plain_fans

    def _find_plain_fans(self) -> dict[str, PlainFan]:
        fans: dict[str, PlainFan] = {}
        counted = self.counted_joins
        for source, edges in self.outgoing.items():
            branches = tuple(dict.fromkeys(edge.target for edge in edges))
            if (len(branches) < 2 or source in self.repeatable
                    or self.nodes[source].uses in _NOT_COUNTED_SOURCES
                    or any(edge.condition or edge.action for edge in edges)):
                continue
            joins = {self._branch_join(source, branch, counted) for branch in branches}
            if (len(joins) == 1 and (join := joins.pop()) is not None
                    and set(self.forward_predecessors[join]) == set(branches)):
                fans[source] = PlainFan(source, join, branches)
        return fans

    def _branch_join(self, source: str, branch: str, counted: frozenset[str]) -> str | None:
        """The counted join ``branch`` leads to, if it is a plain branch of ``source``."""
        node = self.nodes[branch]
        edges = self.outgoing[branch]
        if (self.forward_predecessors.get(branch) != (source,) or branch in self.repeatable
                or len(self.incoming[branch]) != 1 or len(edges) != 1
                or node.uses in _BUILTIN_USES or (node.config and node.config.fallback)
                or branch in self.fallback_only):
            return None
        edge = edges[0]
        if edge.condition or edge.action or edge.target not in counted:
            return None
        return edge.target

    @property
    def counted_joins(self) -> frozenset[str]:
        """``all`` joins that every forward predecessor always reaches by completing: the
        predecessors never skip and always take their edge to the join.

        A node *always runs* when it is outside every loop and is a start node, or every
        forward edge into it comes from a node that always runs and always takes that edge
        (no condition, and no edge of its source has an ``action``, which could steer the
        source elsewhere). A ``batch-scatter`` source does not count (its map may end through
        a path of its own). Such a join runs exactly when all its predecessors have completed,
        so a worker can tell that from a count of their commits instead of their records.
        Empty for a graph with dynamic nodes: their producers change who leads where."""
        if self._counted_joins is None:
            self._counted_joins = self._find_counted_joins()
        return self._counted_joins

    def _find_counted_joins(self) -> frozenset[str]:
        if self.dynamic_node_ids or self.strongly_connected:
            return frozenset()
        steered = {node_id for node_id, edges in self.outgoing.items()
                   if any(edge.action for edge in edges)
                   or self.nodes[node_id].uses in _NOT_COUNTED_SOURCES}
        always: set[str] = set()
        remaining = {node_id: len(sources) for node_id, sources in
                     self.forward_predecessors.items()}
        ready = [node_id for node_id, left in remaining.items()
                 if not left and node_id not in self.fallback_only]
        starts = set(self.start_node_ids)
        while ready:  # forward edges in topological order: the graph has no cycle
            node_id = ready.pop()
            edges = [edge for edge in self.incoming[node_id]
                     if edge.source not in self.fallback_only]
            if (all(edge.source in always and edge.source not in steered and not edge.condition
                    for edge in edges) and (edges or node_id in starts)):
                always.add(node_id)
            for target in dict.fromkeys(edge.target for edge in self.outgoing[node_id]):
                remaining[target] -= 1
                if not remaining[target] and target not in self.fallback_only:
                    ready.append(target)
        return frozenset(
            node_id for node_id, sources in self.forward_predecessors.items()
            if len(sources) > 1 and self.nodes[node_id].join_strategy == "all"
            and all(source in always and source not in steered for source in sources)
            and not any(edge.condition for edge in self.incoming[node_id]))

    # -- queries ----------------------------------------------------------------------

    def node(self, node_id: str) -> NodeDefinition:
        return self.nodes[node_id]

    def is_back_edge(self, source: str, target: str) -> bool:
        return (source, target) in self.back_edges

    def same_cycle(self, a: str, b: str) -> bool:
        component = self.strongly_connected.get(a)
        return component is not None and component == self.strongly_connected.get(b)

    def edge_indices(self, source: str, target: str) -> tuple[int, ...]:
        """Indices into ``outgoing[source]`` of the edges that lead to ``target``."""
        edges = self.outgoing.get(source, _NO_EDGES)
        if len(edges) <= _SCAN_LIMIT:  # most nodes: a scan costs less than an index
            if len(edges) == 1:
                return _FIRST if edges[0].target == target else ()
            return tuple(i for i, edge in enumerate(edges) if edge.target == target)
        index = self._edge_index.get(source)
        if index is None:  # a wide fan-out: indexed once, by target
            index = {}
            for i, edge in enumerate(edges):
                index[edge.target] = (*index.get(edge.target, ()), i)
            self._edge_index[source] = index
        return index.get(target, ())

    def forward_successors(self, node_id: str) -> list[str]:
        return list(
            dict.fromkeys(
                e.target
                for e in self.outgoing[node_id]
                if (node_id, e.target) not in self.back_edges
            )
        )

    # -- dynamic nodes ----------------------------------------------------------------

    def extended(self, additions: Iterable[Mapping[str, Any]]) -> Graph:
        """A copy with dynamic nodes added. Each addition is ``{"nodes": [...], "edges": [...]}``
        in blueprint JSON form; added edges are always forward edges."""
        clone = object.__new__(Graph)
        clone.blueprint = self.blueprint
        clone.nodes = dict(self.nodes)
        clone.start_node_ids = self.start_node_ids
        clone.terminal_node_ids = self.terminal_node_ids
        clone.fallback_only = self.fallback_only
        clone.back_edges = self.back_edges
        clone.strongly_connected = self.strongly_connected
        clone.forward_predecessors = dict(self.forward_predecessors)
        dynamic = list(self.dynamic_node_ids)
        added: dict[str, NodeDefinition] = {}
        edges: list[EdgeDefinition] = []
        for addition in additions:
            for raw in addition.get("nodes", ()):
                node = NodeDefinition.model_validate(raw)
                if node.id in clone.nodes or node.id in added:
                    continue
                added[node.id] = node
                dynamic.append(node.id)
            edges.extend(EdgeDefinition.model_validate(raw) for raw in addition.get("edges", ()))
        clone.nodes.update(added)
        clone.outgoing, clone.incoming = _adjacency(added, self.outgoing, self.incoming, edges)
        touched = {edge.target for edge in edges}
        for node_id in touched:
            clone.forward_predecessors[node_id] = clone._forward_sources(node_id)
        clone.dynamic_node_ids = tuple(dynamic)
        clone.repeatable = clone._repeatable()
        clone._edge_index = {}
        clone._counted_joins = frozenset()
        clone._base = self.root
        return clone


_NOT_COUNTED_SOURCES = frozenset({"batch-scatter"})
_BUILTIN_USES = frozenset({"subflow", "sleep", "wait", "webhook", "batch-scatter",
                           "batch-gather", "loop-controller"})
WIDE_FAN_MIN_BRANCHES = 128
"""How many branches a plain fan needs for its source to store them in items of their own. A
branch item costs each branch one more request (its arrival is counted apart from its
commit); a narrower fan's routing records keep the run's item under about 16 KB."""


@dataclass(frozen=True, slots=True)
class PlainFan:
    """A fan whose branches may be stored in items of their own (:attr:`Graph.plain_fans`)."""

    source: str
    join: str
    branches: tuple[str, ...]
_NO_EDGES: tuple[EdgeDefinition, ...] = ()
_FIRST = (0,)
_SCAN_LIMIT = 8  # a node with more outgoing edges gets an index of them by target


def _adjacency(
    new_nodes: Mapping[str, NodeDefinition],
    outgoing: Mapping[str, Sequence[EdgeDefinition]],
    incoming: Mapping[str, Sequence[EdgeDefinition]],
    edges: Iterable[EdgeDefinition],
) -> tuple[dict[str, Sequence[EdgeDefinition]], dict[str, Sequence[EdgeDefinition]]]:
    """Outgoing and incoming edges per node: ``outgoing``/``incoming`` (left unchanged) plus
    ``new_nodes`` and ``edges``. Tuples, with one shared empty tuple: a graph of 100,000
    nodes holds 200,000 of them."""
    out = dict(outgoing)
    into = dict(incoming)
    out.update(dict.fromkeys(new_nodes, _NO_EDGES))
    into.update(dict.fromkeys(new_nodes, _NO_EDGES))
    grown_out: defaultdict[str, list[EdgeDefinition]] = defaultdict(list)
    grown_in: defaultdict[str, list[EdgeDefinition]] = defaultdict(list)
    for edge in edges:
        grown_out[edge.source].append(edge)
        grown_in[edge.target].append(edge)
    for node_id, found in grown_out.items():
        out[node_id] = (*out[node_id], *found)
    for node_id, found in grown_in.items():
        into[node_id] = (*into[node_id], *found)
    return out, into


def _acyclic(outgoing: Mapping[str, Sequence[EdgeDefinition]],
             incoming: Mapping[str, Sequence[EdgeDefinition]]) -> bool:
    """Whether the graph has no cycle: Kahn's count of remaining incoming edges."""
    remaining = {node_id: len(edges) for node_id, edges in incoming.items() if edges}
    ready = [node_id for node_id, edges in incoming.items() if not edges]
    while ready:
        for edge in outgoing[ready.pop()]:
            left = remaining[edge.target] - 1
            if left:
                remaining[edge.target] = left
            else:
                del remaining[edge.target]
                ready.append(edge.target)
    return not remaining


def _strongly_connected_components(
    outgoing: Mapping[str, Sequence[EdgeDefinition]],
) -> dict[str, int]:
    """Component number per node, only for nodes on a cycle (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    result: dict[str, int] = {}
    counter = 0
    component = 0
    for root in outgoing:
        if root in index:
            continue
        work = [(root, iter(outgoing[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node_id, edges = work[-1]
            edge = next(edges, None)
            if edge is not None:
                target = edge.target
                if target not in index:
                    index[target] = low[target] = counter
                    counter += 1
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(outgoing[target])))
                elif target in on_stack:
                    low[node_id] = min(low[node_id], index[target])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node_id])
            if low[node_id] == index[node_id]:
                members = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    members.append(member)
                    if member == node_id:
                        break
                cyclic = len(members) > 1 or any(
                    e.target == node_id for e in outgoing[node_id]
                )
                if cyclic:
                    for member in members:
                        result[member] = component
                    component += 1
    return result


# -- dynamic nodes and terminals ----------------------------------------------------------------

DYNAMIC_PREFIX = "_flowcraft.dynamic."
"""Context keys holding the nodes a node added at run time (see :func:`dynamic_addition`)."""


def dynamic_additions(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [value for key, value in data.items() if key.startswith(DYNAMIC_PREFIX)]


def graph_for(base: Graph, data: Mapping[str, Any]) -> Graph:
    """``base`` with the dynamic nodes stored in ``data``.

    A worker rebuilds this for every job of a run it reads afresh; the graphs are kept
    (a few, keyed by the additions' JSON: exact, and far cheaper to compute than extending
    a graph by thousands of dynamic nodes)."""
    additions = dynamic_additions(data)
    if not additions:
        return base
    key = (id(base), json.dumps(additions, sort_keys=True, separators=(",", ":"),
                                default=str))
    cached = _EXTENDED.get(key)
    if cached is not None and cached[0] is base:
        _EXTENDED.move_to_end(key)
        return cached[1]
    graph = base.extended(additions)
    _EXTENDED[key] = (base, graph)
    if len(_EXTENDED) > _EXTENDED_LIMIT:
        _EXTENDED.popitem(last=False)
    return graph


_EXTENDED: OrderedDict[tuple[int, str], tuple[Graph, Graph]] = OrderedDict()
_EXTENDED_LIMIT = 32


def dynamic_addition(graph: Graph, node_id: str, nodes: Any) -> dict[str, Any]:
    """Dynamic nodes sit between their producer and the producer's forward successors.

    A node whose definition has ``follows`` (ids of nodes listed before it in ``nodes``)
    runs after those nodes instead of after the producer, and they lead to it alone; the
    key is not kept in the stored definition. Raises :class:`FlowcraftError` when
    ``follows`` is not a non-empty list of such ids."""
    successors = graph.forward_successors(node_id)
    definitions: list[dict[str, Any]] = []
    edges: list[dict[str, str]] = []
    listed: set[str] = set()
    followed: set[str] = set()
    for n in nodes:
        definition = (n.to_dict() if isinstance(n, NodeDefinition)
                      else NodeDefinition.model_validate(n).to_dict())
        after = definition.pop(FOLLOWS, None)
        if after is None:
            edges.append({"source": node_id, "target": definition["id"]})
        else:
            if (not isinstance(after, list) or not after
                    or not all(isinstance(a, str) and a in listed for a in after)):
                raise FlowcraftError(
                    f"node '{node_id}' added node '{definition['id']}' whose '{FOLLOWS}' is "
                    f"not a non-empty list of nodes added before it: {after!r}",
                    node_id=node_id,
                )
            edges.extend({"source": a, "target": definition["id"]} for a in dict.fromkeys(after))
            followed.update(after)
        definitions.append(definition)
        listed.add(definition["id"])
    edges += [{"source": d["id"], "target": s} for d in definitions if d["id"] not in followed
              for s in successors]
    return {"nodes": definitions, "edges": edges}


def terminal_ids(graph: Graph) -> list[str]:
    return [
        node_id for node_id, edges in graph.outgoing.items()
        if not edges and node_id not in graph.fallback_only
    ]
