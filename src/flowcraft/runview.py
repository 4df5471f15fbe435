"""What a stored run looks like to a person: node states, timings, errors, the drawn graph.

The one place that reads a run's stored records for display. Workers store a
run as one context dict (see :mod:`flowcraft.distributed.context` and
:mod:`flowcraft.core.routing`) plus a status record; these pure functions
turn the two into typed views:

* :func:`node_states` — each node's state, derived in this order of precedence:

  ``awaiting``  listed in ``_awaitingNodeIds`` (a parked ``wait`` node);
  ``running``   holds a live lease ``_flowcraft.lock.<id>`` (the owner is shown);
  ``failed``    its record ``_flowcraft.node.<id>`` says ``failed``;
  ``skipped``   its record says ``skipped``;
  ``done``      it has a completed record;
  ``pending``   nothing yet (or only an expired lease of a crashed worker).

  A lease beats a record because in a loop a node that completed an earlier
  iteration runs again under a new lease.
* :func:`run_view` — status, blueprint id, start / last update / duration,
  errors, node states and the graph with a layered layout.
* :func:`run_summary` — one row of a run list, from the status record alone.

Nothing here does I/O; the web view and the client call these with what
they loaded, so every view of a run says the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from .blueprint import EdgeDefinition, NodeDefinition, WorkflowBlueprint
from .context import INTERNAL_PREFIX
from .core.graph import DYNAMIC_PREFIX
from .core.routing import (
    AWAITING_DETAILS_KEY,
    AWAITING_IDS_KEY,
    INPUTS_PREFIX,
    OUTPUTS_PREFIX,
    RECORD_PREFIX,
    read_record,
    read_reference,
)

NodeState = Literal["pending", "running", "done", "skipped", "failed", "awaiting"]
NODE_STATES: tuple[NodeState, ...] = ("pending", "running", "done", "skipped", "failed",
                                      "awaiting")
RUN_STATUSES = ("running", "awaiting", "completed", "failed", "cancelled")
FINAL_RUN_STATUSES = frozenset({"completed", "failed", "cancelled"})

# Mirrors of distributed/context.py's keys (kept literal: this module must not import the
# distributed package, which pulls in the worker).
_LOCK_PREFIX = f"{INTERNAL_PREFIX}lock."
_RUN_STATE_KEY = f"{INTERNAL_PREFIX}run"
_START_FIELDS = ("startedAt", "createdAt", "startTime")


@dataclass(frozen=True, slots=True)
class NodeView:
    """One node of a run as shown: its state and what is stored about it."""

    id: str
    uses: str | None
    state: NodeState
    input: Any = None
    output: Any = None
    error: str | None = None
    attempts: int | None = None
    iterations: int = 0
    """How often the node resolved (completed or skipped); above 1 only in loops."""
    action: str | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None
    awaiting: Mapping[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(_json_ready(asdict(self)))


@dataclass(frozen=True, slots=True)
class EdgeView:
    source: str
    target: str
    action: str | None = None
    condition: str | None = None
    transform: str | None = None
    back: bool = False
    """A loop's back edge (drawn against the flow)."""
    taken: bool = False
    """The source's stored routing record took this edge."""

    @property
    def label(self) -> str:
        parts = [p for p in (self.action, f"if {self.condition}" if self.condition else None)
                 if p]
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}


@dataclass(frozen=True, slots=True)
class PlacedNode:
    id: str
    uses: str | None
    layer: int
    order: int
    x: float
    y: float


@dataclass(frozen=True, slots=True)
class GraphView:
    nodes: tuple[PlacedNode, ...]
    edges: tuple[EdgeView, ...]
    width: float
    height: float

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": [asdict(n) for n in self.nodes],
                "edges": [e.to_dict() for e in self.edges],
                "width": self.width, "height": self.height}


@dataclass(frozen=True, slots=True)
class RunSummary:
    """A run in a list: what its status record says."""

    run_id: str
    status: str
    blueprint_id: str | None
    started_at: float | None
    last_updated: float | None
    duration_seconds: float | None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class RunView:
    run_id: str
    status: str
    blueprint_id: str | None
    started_at: float | None
    last_updated: float | None
    duration_seconds: float | None
    errors: tuple[str, ...]
    nodes: Mapping[str, NodeView]
    graph: GraphView
    awaiting_node_ids: tuple[str, ...] = ()
    status_record: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runId": self.run_id, "status": self.status, "blueprintId": self.blueprint_id,
            "startedAt": self.started_at, "lastUpdated": self.last_updated,
            "durationSeconds": self.duration_seconds, "errors": list(self.errors),
            "nodes": {k: v.to_dict() for k, v in self.nodes.items()},
            "graph": self.graph.to_dict(), "awaitingNodeIds": list(self.awaiting_node_ids),
            "statusRecord": _json_ready(dict(self.status_record)),
        }


# -- node states -------------------------------------------------------------------------------


def node_states(blueprint: WorkflowBlueprint | None, data: Mapping[str, Any] | None,
                status: Mapping[str, Any] | None = None,
                now: float | None = None) -> dict[str, NodeView]:
    """Each node's state and stored input, output, error and attempts, in blueprint order.

    ``data`` is the run's stored context (``None`` when it has none yet); ``status`` its
    status record; ``now`` (epoch seconds) decides which leases are live. Nodes a running
    workflow added dynamically, and nodes the context knows but ``blueprint`` lacks (or no
    blueprint at all), are included.
    """
    data = data or {}
    now = time.time() if now is None else now
    awaiting_ids = [str(i) for i in (data.get(AWAITING_IDS_KEY) or [])]
    awaiting_details = data.get(AWAITING_DETAILS_KEY) or {}
    run_error = _run_state(data).get("error")
    run_error = run_error if isinstance(run_error, Mapping) else {}
    failed_node = (status or {}).get("failedNodeId") or run_error.get("nodeId")
    views: dict[str, NodeView] = {}
    definitions = {n.id: n for n in _all_nodes(blueprint, data)}
    for node_id, uses in _node_ids(blueprint, data):
        record = read_record(data, node_id)
        lease = data.get(_LOCK_PREFIX + node_id)
        live = isinstance(lease, Mapping) and _number(lease.get("expires")) > now
        state: NodeState
        if node_id in awaiting_ids:
            state = "awaiting"
        elif live:
            state = "running"
        elif record is None:
            state = "pending"
        elif record.failed:
            state = "failed"
        elif record.skipped:
            state = "skipped"
        else:
            state = "done"
        error = None
        attempts = None
        if state == "failed" or node_id == failed_node:
            raw = data.get(RECORD_PREFIX + node_id)
            error = (raw.get("error") if isinstance(raw, Mapping) else None) or (
                run_error.get("message") if node_id == failed_node else None)
            if node_id == failed_node and run_error.get("attempt") is not None:
                attempts = int(run_error["attempt"])
        views[node_id] = NodeView(
            id=node_id, uses=uses, state=state,
            input=_input(definitions.get(node_id), node_id, data, state),
            output=data.get(OUTPUTS_PREFIX + node_id),
            error=str(error) if error is not None else None,
            attempts=attempts,
            iterations=record.count if record else 0,
            action=record.action if record else None,
            lease_owner=str(lease.get("owner")) if live and isinstance(lease, Mapping) else None,
            lease_expires=_number(lease.get("expires")) if live and isinstance(
                lease, Mapping) else None,
            awaiting=awaiting_details.get(node_id) if node_id in awaiting_ids else None,
        )
    return views


def _input(node: NodeDefinition | None, node_id: str, data: Mapping[str, Any],
           state: NodeState) -> Any:
    """What the node received: the engine stores edge deliveries as ``_inputs.<id>``;
    explicit ``inputs`` are read from the context as the node read them."""
    key = INPUTS_PREFIX + node_id
    if key in data or node is None or node.inputs is None or state in ("pending", "skipped"):
        return data.get(key)
    if isinstance(node.inputs, str):
        return read_reference(data, node.inputs)
    return {name: read_reference(data, ref) for name, ref in node.inputs.items()}


def _node_ids(blueprint: WorkflowBlueprint | None,
              data: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    found: dict[str, str | None] = {}
    for node in _all_nodes(blueprint, data):
        found.setdefault(node.id, node.uses)
    # Nodes only the context knows of (a blueprint changed since, or none was given).
    for key in data:
        for prefix in (RECORD_PREFIX, OUTPUTS_PREFIX):
            if key.startswith(prefix):
                found.setdefault(key[len(prefix):], None)
    for node_id in data.get(AWAITING_IDS_KEY) or []:
        found.setdefault(str(node_id), None)
    return list(found.items())


def _all_nodes(blueprint: WorkflowBlueprint | None,
               data: Mapping[str, Any]) -> list[NodeDefinition]:
    nodes = list(blueprint.nodes) if blueprint else []
    for addition in _dynamic_additions(data):
        for node in addition.get("nodes") or []:
            if isinstance(node, Mapping) and node.get("id"):
                nodes.append(NodeDefinition(id=str(node["id"]), uses=str(node.get("uses", "?"))))
    return nodes


def _all_edges(blueprint: WorkflowBlueprint | None,
               data: Mapping[str, Any]) -> list[EdgeDefinition]:
    edges = list(blueprint.edges) if blueprint else []
    for addition in _dynamic_additions(data):
        for edge in addition.get("edges") or []:
            if isinstance(edge, Mapping) and edge.get("source") and edge.get("target"):
                edges.append(EdgeDefinition(
                    source=str(edge["source"]), target=str(edge["target"]),
                    action=edge.get("action"), condition=edge.get("condition")))
    return edges


def _dynamic_additions(data: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [value for key, value in data.items()
            if key.startswith(DYNAMIC_PREFIX) and isinstance(value, Mapping)]


# -- the run -----------------------------------------------------------------------------------


def run_summary(status: Mapping[str, Any], now: float | None = None) -> RunSummary:
    """A run list's row from a status record (``runId``, ``status``, ``blueprintId``,
    ``lastUpdated``, a start field where one is stored)."""
    state = str(status.get("status") or "unknown")
    started = _first_time(status, _START_FIELDS)
    last = parse_time(status.get("lastUpdated"))
    error = status.get("error")
    return RunSummary(
        run_id=str(status.get("runId") or status.get("id") or ""), status=state,
        blueprint_id=status.get("blueprintId"), started_at=started, last_updated=last,
        duration_seconds=_duration(state, started, last, now),
        error=str(error) if error else None,
    )


def run_view(blueprint: WorkflowBlueprint | None, data: Mapping[str, Any] | None,
             status_record: Mapping[str, Any] | None, *, run_id: str | None = None,
             now: float | None = None) -> RunView:
    """The whole page of a run: summary, errors, node states and the laid-out graph."""
    data = data or {}
    record = dict(status_record or {})
    now = time.time() if now is None else now
    run_state = _run_state(data)
    if not record.get("status") and run_state.get("status"):
        record["status"] = run_state["status"]  # the status write was lost; the context knows
    summary = run_summary({"runId": run_id or "", **record}, now)
    nodes = node_states(blueprint, data, record, now)
    errors: list[str] = []
    for message in (record.get("error"), run_state.get("reason")):
        if message and str(message) not in errors:
            errors.append(str(message))
    for view in nodes.values():
        if view.state == "failed" and view.error and not any(view.error in e for e in errors):
            errors.append(f"node '{view.id}' failed: {view.error}")
    return RunView(
        run_id=summary.run_id, status=summary.status,
        blueprint_id=summary.blueprint_id or (blueprint.id if blueprint else None),
        started_at=summary.started_at, last_updated=summary.last_updated,
        duration_seconds=summary.duration_seconds, errors=tuple(errors), nodes=nodes,
        graph=graph_view(blueprint, data, [n.id for n in nodes.values()]),
        awaiting_node_ids=tuple(str(i) for i in data.get(AWAITING_IDS_KEY) or []),
        status_record=record,
    )


def _run_state(data: Mapping[str, Any]) -> Mapping[str, Any]:
    value = data.get(_RUN_STATE_KEY)
    return value if isinstance(value, Mapping) else {}


def _duration(state: str, started: float | None, last: float | None,
              now: float | None) -> float | None:
    if started is None:
        return None
    end = last if state in FINAL_RUN_STATUSES or now is None else now
    if end is None:
        return None
    return round(max(0.0, end - started), 3)


def _first_time(record: Mapping[str, Any], names: Sequence[str]) -> float | None:
    for name in names:
        value = parse_time(record.get(name))
        if value is not None:
            return value
    return None


def parse_time(value: Any) -> float | None:
    """A stored timestamp as epoch seconds: numbers (seconds or milliseconds) or ISO-8601."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) / 1000.0 if value > 1e11 else float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return parse_time(float(text))
        except ValueError:
            pass
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    try:
        return parse_time(float(value))  # Decimal from DynamoDB
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _json_ready(value: Any) -> Any:
    """Stored values as JSON can carry them (DynamoDB numbers are ``Decimal``)."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return int(number) if number.is_integer() else number


# -- the graph and its layout ------------------------------------------------------------------

LAYER_GAP = 200.0
ROW_GAP = 90.0
NODE_WIDTH = 150.0
NODE_HEIGHT = 48.0
MARGIN = 30.0


def graph_view(blueprint: WorkflowBlueprint | None, data: Mapping[str, Any] | None = None,
               extra_node_ids: Iterable[str] = ()) -> GraphView:
    """The blueprint (plus dynamically added nodes) laid out left to right in layers."""
    data = data or {}
    uses: dict[str, str | None] = {n.id: n.uses for n in _all_nodes(blueprint, data)}
    for node_id in extra_node_ids:
        uses.setdefault(node_id, None)
    edges = [e for e in _all_edges(blueprint, data) if e.source in uses and e.target in uses]
    pairs = [(e.source, e.target) for e in edges]
    layers, order, back = layered_layout(list(uses), pairs)
    taken_by_source: dict[str, set[int]] = {}
    outgoing_index: dict[str, int] = {}
    edge_views = []
    for edge in edges:
        index = outgoing_index.get(edge.source, 0)
        outgoing_index[edge.source] = index + 1
        if edge.source not in taken_by_source:
            record = read_record(data, edge.source)
            taken_by_source[edge.source] = set(record.taken) if record else set()
        edge_views.append(EdgeView(
            source=edge.source, target=edge.target, action=edge.action,
            condition=edge.condition, transform=edge.transform,
            back=(edge.source, edge.target) in back,
            taken=index in taken_by_source[edge.source],
        ))
    placed = tuple(
        PlacedNode(id=node_id, uses=uses[node_id], layer=layers[node_id], order=order[node_id],
                   x=MARGIN + layers[node_id] * LAYER_GAP, y=MARGIN + order[node_id] * ROW_GAP)
        for node_id in uses
    )
    width = MARGIN * 2 + max((n.layer for n in placed), default=0) * LAYER_GAP + NODE_WIDTH
    height = MARGIN * 2 + max((n.order for n in placed), default=0) * ROW_GAP + NODE_HEIGHT
    return GraphView(placed, tuple(edge_views), width, height)


def layered_layout(node_ids: Sequence[str], edges: Sequence[tuple[str, str]]
                   ) -> tuple[dict[str, int], dict[str, int], set[tuple[str, str]]]:
    """Longest-path layering with barycentre ordering.

    Returns (layer per node, row within its layer, back edges). Back edges (those closing
    a cycle in a depth-first walk from the nodes without predecessors) are left out of the
    layering, so every other edge goes from a lower layer to a strictly higher one.
    """
    successors: dict[str, list[str]] = {n: [] for n in node_ids}
    predecessors: dict[str, list[str]] = {n: [] for n in node_ids}
    for source, target in edges:
        successors[source].append(target)
        predecessors[target].append(source)
    back = _back_edges(node_ids, successors, predecessors)
    forward_preds: dict[str, list[str]] = {n: [] for n in node_ids}
    for source, target in edges:
        if (source, target) not in back and source != target:
            forward_preds[target].append(source)
    layers: dict[str, int] = {}

    def layer_of(node_id: str) -> int:
        # Iterative longest path: recursion depth would limit the size of a chain.
        stack = [node_id]
        while stack:
            current = stack[-1]
            if current in layers:
                stack.pop()
                continue
            missing = [p for p in forward_preds[current] if p not in layers]
            if missing:
                stack.extend(missing)
                continue
            layers[current] = 1 + max((layers[p] for p in forward_preds[current]), default=-1)
            stack.pop()
        return layers[node_id]

    for node_id in node_ids:
        layer_of(node_id)
    by_layer: dict[int, list[str]] = {}
    for node_id in node_ids:
        by_layer.setdefault(layers[node_id], []).append(node_id)
    order = {n: i for members in by_layer.values() for i, n in enumerate(members)}
    # Two downward sweeps of barycentre ordering reduce crossings; ties keep blueprint order.
    for _ in range(2):
        for layer in sorted(by_layer)[1:]:
            members = by_layer[layer]

            def barycentre(node_id: str) -> float:
                preds = forward_preds[node_id]
                return (sum(order[p] for p in preds) / len(preds)) if preds else order[node_id]

            members.sort(key=lambda n: (barycentre(n), order[n]))
            for index, node_id in enumerate(members):
                order[node_id] = index
    return layers, order, back


def _back_edges(node_ids: Sequence[str], successors: Mapping[str, list[str]],
                predecessors: Mapping[str, list[str]]) -> set[tuple[str, str]]:
    roots = [n for n in node_ids if not predecessors[n]] + list(node_ids)
    colour: dict[str, int] = {}  # 1 on the walk's path, 2 finished
    back: set[tuple[str, str]] = set()
    for root in roots:
        if root in colour:
            continue
        colour[root] = 1
        stack: list[tuple[str, int]] = [(root, 0)]
        while stack:
            node_id, index = stack[-1]
            if index < len(successors[node_id]):
                stack[-1] = (node_id, index + 1)
                target = successors[node_id][index]
                state = colour.get(target)
                if state == 1:
                    back.add((node_id, target))
                elif state is None:
                    colour[target] = 1
                    stack.append((target, 0))
            else:
                colour[node_id] = 2
                stack.pop()
    return back
