"""Routing records, edge routing and node inputs, shared by every engine.

**The state lives in the context.** When a node finishes, the engine writes,
in the same commit as its output, a small record under
``_flowcraft.node.<id>``::

    {"n": 1, "taken": [0, 2], "action": "ok"}   # completed; indices into its outgoing edges
    {"n": 1, "skipped": true}                    # skipped: no predecessor delivered to it

``n`` counts how often the node resolved (completed or was skipped); it only
exceeds 1 in loops. Everything else is derived from these records: whether a
join is ready, what a node receives as input, which nodes are ready after a
crash (:func:`flowcraft.core.successors.frontier`). Recording *where* a node routed, rather than
re-evaluating conditions later, makes routing decisions stable under
redelivery: a job processed twice routes the same way twice.

**Joins** and everything else about what follows a finished node are decided
in :mod:`flowcraft.core.successors`, from these records.

**Expressions** see the context through :class:`ExpressionNames`: fixed names
(``result`` for conditions, ``input`` for transforms), ``context``, and any
other name as a context key or, where no key has that name, as a node id
standing for that node's output (blueprints written for the TypeScript
library read outputs that way; outputs are still stored once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..blueprint import EdgeDefinition, NodeDefinition
from ..context import (
    INTERNAL_PREFIX,
    ConditionNames,
    ExpressionNames,
    check_storable,
)
from ..context import OUTPUTS_PREFIX as OUTPUTS_PREFIX  # re-exported: next to the record keys
from ..errors import ExpressionError, UnstorableValueError
from ..expressions import evaluate
from .graph import Graph

RECORD_PREFIX = f"{INTERNAL_PREFIX}node."
INPUTS_PREFIX = "_inputs."
AWAITING_IDS_KEY = "_awaitingNodeIds"
AWAITING_DETAILS_KEY = "_awaitingDetails"
LOOP_CONTROLLER = "loop-controller"


def record_key(node_id: str) -> str:
    return RECORD_PREFIX + node_id


def output_key(node_id: str) -> str:
    return OUTPUTS_PREFIX + node_id


@dataclass(frozen=True, slots=True)
class NodeRecord:
    count: int
    skipped: bool = False
    taken: tuple[int, ...] = ()
    action: str | None = None
    failed: bool = False
    wake_up_at: float | None = None
    taken_set: frozenset[int] = frozenset()

    @classmethod
    def from_value(cls, value: Any) -> NodeRecord | None:
        if not isinstance(value, Mapping):
            return None
        taken = tuple(int(i) for i in value.get("taken", ()))
        return cls(
            count=int(value.get("n", 1)),
            skipped=bool(value.get("skipped", False)),
            taken=taken,
            action=value.get("action"),
            failed=bool(value.get("failed", False)),
            wake_up_at=value.get("wakeUpAt"),
            taken_set=frozenset(taken),
        )

    def delivered_to(self, graph: Graph, source: str, target: str) -> int | None:
        """The index of the first edge ``source -> target`` this record took, if any."""
        if self.skipped or self.failed:
            return None
        for index in graph.edge_indices(source, target):
            if index in self.taken_set:
                return index
        return None


# Records are parsed once per stored value: a fan-out source's record (one entry per
# branch) is read by every branch, and parsing it each time would make fan-outs quadratic.
# Stored records are never mutated in place (each write stores a new dict), so the value's
# identity is a safe key while the cache holds a reference to it.
_RECORD_CACHE: dict[int, tuple[Any, NodeRecord]] = {}
_RECORD_CACHE_LIMIT = 100_000


class StoredRecord(dict[str, Any]):
    """A record value this process wrote, carrying its parsed form: a plain dict to JSON and
    to every reader, but read back without parsing (runs read each record many times)."""

    __slots__ = ("parsed",)

    parsed: NodeRecord

    def __reduce__(self) -> Any:  # copies and pickles are plain dicts: parsed when read
        return (dict, (dict(self),))


# The few shapes of ``taken`` (mostly ``(0,)``) shared by every record: large runs hold
# one record per node.
_TAKEN_SETS: dict[tuple[int, ...], tuple[tuple[int, ...], frozenset[int]]] = {}


def _stored(value: dict[str, Any]) -> StoredRecord:
    stored = StoredRecord(value)
    taken = tuple(value.get("taken", ()))
    shared = _TAKEN_SETS.get(taken)
    if shared is None:
        shared = (taken, frozenset(taken))
        if len(taken) <= 4 and len(_TAKEN_SETS) < 1024:
            _TAKEN_SETS[taken] = shared
    stored.parsed = NodeRecord(count=value["n"], skipped=value.get("skipped", False),
                               taken=shared[0], action=value.get("action"),
                               failed=value.get("failed", False), taken_set=shared[1])
    return stored


def read_record(data: Mapping[str, Any], node_id: str) -> NodeRecord | None:
    value = data.get(RECORD_PREFIX + node_id)
    if value is None:
        return None
    if type(value) is StoredRecord:
        return value.parsed
    cached = _RECORD_CACHE.get(id(value))
    if cached is not None and cached[0] is value:
        return cached[1]
    record = NodeRecord.from_value(value)
    if record is not None and len(record.taken) > 8:
        if len(_RECORD_CACHE) >= _RECORD_CACHE_LIMIT:
            _RECORD_CACHE.clear()
        _RECORD_CACHE[id(value)] = (value, record)
    return record


def resolution_count(data: Mapping[str, Any], node_id: str) -> int:
    """How often ``node_id`` has resolved so far: the generation its next run belongs to."""
    record = read_record(data, node_id)
    return record.count if record else 0


def completed_record(
    previous_count: int, taken: list[int], action: str | None
) -> dict[str, Any]:
    value: dict[str, Any] = {"n": previous_count + 1, "taken": taken}
    if action is not None:
        value["action"] = action
    return _stored(value)


def skipped_record(previous_count: int) -> dict[str, Any]:
    return _stored({"n": previous_count + 1, "skipped": True})


# Records equal between nodes (``{"n": 1, "taken": [0]}`` for most nodes of a large run),
# kept once. Only for engines that never change a stored record in place: the workers add
# commit details to theirs, so they use the functions above.
_SHARED_RECORDS: dict[tuple[int, tuple[int, ...], str | None, bool], StoredRecord] = {}
_SHARED_RECORDS_LIMIT = 4096


def shared_completed_record(
    previous_count: int, taken: list[int], action: str | None
) -> dict[str, Any]:
    """:func:`completed_record`, the same object for every equal record. The caller must
    never change it in place (the in-memory runtime replaces records, never edits them)."""
    if previous_count > 2 or len(taken) > 4 or (action is not None and len(action) > 64):
        return completed_record(previous_count, taken, action)
    key = (previous_count, tuple(taken), action, False)
    shared = _SHARED_RECORDS.get(key)
    if shared is None:
        shared = _stored_once(key, completed_record(previous_count, taken, action))
    return shared


def shared_skipped_record(previous_count: int) -> dict[str, Any]:
    """:func:`skipped_record`, shared as :func:`shared_completed_record` is."""
    if previous_count > 2:
        return skipped_record(previous_count)
    key = (previous_count, (), None, True)
    shared = _SHARED_RECORDS.get(key)
    if shared is None:
        shared = _stored_once(key, skipped_record(previous_count))
    return shared


def _stored_once(key: tuple[int, tuple[int, ...], str | None, bool],
                 record: dict[str, Any]) -> StoredRecord:
    assert type(record) is StoredRecord
    if len(_SHARED_RECORDS) < _SHARED_RECORDS_LIMIT:
        _SHARED_RECORDS[key] = record
    return record


def failed_record(previous_count: int, message: str,
                  details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A failed node's record; ``details`` (error type, traceback) are kept with it."""
    record: dict[str, Any] = {"n": previous_count + 1, "failed": True, "error": message}
    if details:
        record.update({key: details[key] for key in ("errorType", "traceback", "attempt")
                       if details.get(key) is not None})
    return _stored(record)


# -- routing ---------------------------------------------------------------------------------


EdgeObserver = Callable[[EdgeDefinition, bool], None]


def route(
    graph: Graph,
    source_id: str,
    output: Any,
    action: str | None,
    data: Mapping[str, Any],
    on_evaluate: EdgeObserver | None = None,
) -> list[int]:
    """Indices (into ``graph.outgoing[source_id]``) of the edges a finished node takes.

    With an ``action``, edges carrying that action are candidates; if none of
    them is taken, edges without an action are. An edge with a condition is
    taken only if the condition is truthy. A ``loop-controller``'s edges with a
    condition are tried first, whatever the action: if any holds, only those are taken.
    """
    edges = graph.outgoing.get(source_id, ())
    if not edges:
        return []
    if len(edges) == 1 and edges[0].condition is None and edges[0].action is None:
        return [0]  # one plain edge: taken whatever the action (the rules below agree)
    names: ConditionNames | None = None
    verdicts: dict[int, bool] = {}

    def taken(edge: EdgeDefinition) -> bool:
        if not edge.condition:
            return True
        key = id(edge)
        if key not in verdicts:  # each condition is evaluated (and reported) once
            verdicts[key] = check(edge)
        return verdicts[key]

    def check(edge: EdgeDefinition) -> bool:
        nonlocal names
        assert edge.condition is not None
        if names is None:
            names = ConditionNames(data, {"output": output, "action": action})
        try:
            verdict = bool(evaluate(edge.condition, names))
        except ExpressionError as exc:
            raise ExpressionError(
                f"condition of edge {edge.source} -> {edge.target} failed: {exc.message}",
                expression=edge.condition,
            ) from None
        if on_evaluate is not None:
            on_evaluate(edge, verdict)
        return verdict

    chosen: list[int] = []
    if graph.nodes[source_id].uses == LOOP_CONTROLLER:
        # A loop's conditional exits are checked on every iteration, whatever the action:
        # the first iteration where one holds leaves the loop through it.
        chosen = [i for i, e in enumerate(edges) if e.condition and taken(e)]
        if chosen:
            return chosen
    if action is not None:
        chosen = [i for i, e in enumerate(edges) if e.action == action and taken(e)]
    if not chosen:
        chosen = [i for i, e in enumerate(edges) if e.action is None and taken(e)]
    return chosen


def transform_delivery(edge: EdgeDefinition, output: Any, data: Mapping[str, Any]) -> Any:
    """What ``edge`` delivers: the output, or its transform, which must be storable (it is
    stored as the target's input); raises :class:`ExpressionError` naming the edge."""
    if not edge.transform:
        return output
    try:
        value = evaluate(edge.transform, ExpressionNames(data, {"input": output}))
        if value is not output:  # a stored output is storable already
            check_storable(value, "its result")
        return value
    except (ExpressionError, UnstorableValueError) as exc:
        raise ExpressionError(
            f"transform of edge {edge.source} -> {edge.target} failed: {exc.message}",
            expression=edge.transform,
        ) from None


# -- deliveries ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delivery:
    source: str
    edge: EdgeDefinition
    back: bool


def fresh_record(graph: Graph, data: Mapping[str, Any], source: str, target: str,
                 target_count: int, back: bool) -> NodeRecord | None:
    """``source``'s record if it resolved for ``target``'s pending run (generation
    ``target_count``); ``None`` if it did not, or failed."""
    record = read_record(data, source)
    if record is None or record.failed:
        return None  # a failed node never resolves: what needed it never runs
    if back:
        # A back edge's source finished in the iteration the target last ran.
        return record if target_count > 0 and record.count >= target_count else None
    if graph.same_cycle(source, target):
        return record if record.count > target_count else None
    return record


def deliveries(graph: Graph, data: Mapping[str, Any], target: str) -> list[Delivery]:
    """Predecessor edges that delivered to ``target``'s pending run, in edge order."""
    target_count = resolution_count(data, target)
    found: list[Delivery] = []
    seen: set[str] = set()
    for edge in graph.incoming.get(target, ()):
        if edge.source in seen:
            continue
        back = graph.is_back_edge(edge.source, target)
        record = fresh_record(graph, data, edge.source, target, target_count, back)
        if record is None:
            continue
        index = record.delivered_to(graph, edge.source, target)
        if index is not None:
            found.append(Delivery(edge.source, graph.outgoing[edge.source][index], back))
            seen.add(edge.source)
    return found


# -- inputs ----------------------------------------------------------------------------------


def read_reference(data: Mapping[str, Any], reference: str) -> Any:
    """``"_x"`` → context key; ``"n.a.b"`` → path ``a.b`` in node n's output; ``"n"`` → n's
    output if it has one, else context key ``n``."""
    if reference.startswith("_"):
        return data.get(reference)
    whole = OUTPUTS_PREFIX + reference
    if whole in data:
        return data[whole]
    head, _, path = reference.partition(".")
    if path and OUTPUTS_PREFIX + head in data:
        return _follow(data[OUTPUTS_PREFIX + head], path.split("."))
    return data.get(reference)


def _follow(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list | tuple) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else None
        else:
            return None
    return value


@dataclass(frozen=True, slots=True)
class ResolvedInput:
    value: Any
    store: bool
    """Whether the engine records it as ``_inputs.<id>`` (edge deliveries, not explicit inputs)."""


def resolve_input(
    graph: Graph, node: NodeDefinition, data: Mapping[str, Any], first_arrival: str | None = None
) -> ResolvedInput:
    """What a node receives as ``ctx.input`` for its pending run: its explicit ``inputs``
    (unless an edge that delivered to it has a ``transform``), else what its edges delivered."""
    if node.inputs is not None:
        transformed = _transformed_explicit_input(graph, node, data, first_arrival)
        if transformed is not None:
            return transformed
        if isinstance(node.inputs, str):
            return ResolvedInput(read_reference(data, node.inputs), False)
        return ResolvedInput(
            {name: read_reference(data, ref) for name, ref in node.inputs.items()}, False
        )
    incoming = graph.incoming.get(node.id, ())
    if len(incoming) == 1 and not incoming[0].transform:
        # One way in (chains, fan-out branches): the common case, without the general search.
        edge = incoming[0]
        record = fresh_record(graph, data, edge.source, node.id, resolution_count(data, node.id),
                              graph.is_back_edge(edge.source, node.id))
        if record is not None and record.delivered_to(graph, edge.source, node.id) is not None:
            return ResolvedInput(data.get(OUTPUTS_PREFIX + edge.source), True)
        return ResolvedInput(data.get(INPUTS_PREFIX + node.id), False)
    found = deliveries(graph, data, node.id)
    if not found:
        # Start nodes (and subflow children) may be handed an input by whoever started them.
        return ResolvedInput(data.get(INPUTS_PREFIX + node.id), False)
    back = [d for d in found if d.back]
    if back:
        chosen = back[0]
        return ResolvedInput(_delivered_value(chosen, data), True)
    if len(graph.forward_predecessors.get(node.id, ())) <= 1:
        return ResolvedInput(_delivered_value(found[0], data), True)
    if node.join_strategy == "any":
        chosen = next((d for d in found if d.source == first_arrival), found[0])
        return ResolvedInput(_delivered_value(chosen, data), True)
    return ResolvedInput({d.source: _delivered_value(d, data) for d in found}, True)


def _transformed_explicit_input(graph: Graph, node: NodeDefinition, data: Mapping[str, Any],
                                first_arrival: str | None) -> ResolvedInput | None:
    """A transform on a delivering edge decides the input of a node with explicit ``inputs``,
    as in the TypeScript library. Its ``input`` is the value a string ``inputs`` names when
    that is an ``_`` key or another node's output, else the edge's source output."""
    if not any(edge.transform for edge in graph.incoming.get(node.id, ())):
        return None
    found = [d for d in deliveries(graph, data, node.id) if d.edge.transform]
    if not found:
        return None
    # The loop's back edge first (this iteration), then the first arrival, then edge order.
    chosen = next((d for d in found if d.back), None) or next(
        (d for d in found if d.source == first_arrival), found[0])
    base = data.get(OUTPUTS_PREFIX + chosen.source)
    reference = node.inputs
    if isinstance(reference, str) and reference != chosen.source:
        key = reference if reference.startswith("_") else OUTPUTS_PREFIX + reference
        if key in data:
            base = data[key]
    return ResolvedInput(transform_delivery(chosen.edge, base, data), True)


def _delivered_value(delivery: Delivery, data: Mapping[str, Any]) -> Any:
    return transform_delivery(delivery.edge, data.get(OUTPUTS_PREFIX + delivery.source), data)
