"""Replay: a run's state at every step, rebuilt from its log without running any node.

Two sources:

* an event log (``FlowRuntime(event_store=InMemoryEventStore())``, then
  ``await store.events(run_id)``): :func:`replay` folds the events in order -
  ``workflow:start`` carries the starting context, ``node:finish`` an output (or the
  details of a parked node), ``context:change`` a write, ``node:error`` and
  ``node:skipped`` a node's end. Every event is one step.
* a stored run context (a worker's, or a saved ``serialized_context``):
  :func:`events_from_context` turns its routing records ``_flowcraft.node.<id>`` into
  the same events, ordered by the commit time workers write into each record (``t``;
  records without one keep their place in the document, which for an in-memory run is
  the order nodes first resolved). A record holds a node's last resolution only, so a
  loop shows its last iteration, and keys other than outputs show their final values.

Each :class:`ReplayStep` holds the context after the step and every node's state then
(``running``, ``completed``, ``failed``, ``skipped``, ``awaiting``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .context import INTERNAL_PREFIX, public_view
from .core.routing import (
    AWAITING_DETAILS_KEY,
    AWAITING_IDS_KEY,
    INPUTS_PREFIX,
    OUTPUTS_PREFIX,
    RECORD_PREFIX,
)
from .events import FlowcraftEvent, event_from_dict, event_to_dict

NodeState = str


@dataclass(frozen=True)
class ReplayStep:
    """The run after one event: ``context`` (with ``_outputs.*``) and ``nodes`` (id -> state)."""

    index: int
    event: FlowcraftEvent
    context: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, NodeState] = field(default_factory=dict)

    @property
    def node_id(self) -> str | None:
        node_id = self.event.payload.get("nodeId")
        return node_id if isinstance(node_id, str) else None

    def describe(self) -> str:
        """One line: ``3 node:finish b -> {"x": 1}``."""
        payload = self.event.payload
        text = f"{self.index} {self.event.type}"
        if self.node_id:
            text += f" {self.node_id}"
        if self.event.type == "node:finish":
            if "awaiting" in payload:
                text += f" awaiting {_short(payload['awaiting'])}"
            else:
                text += f" -> {_short(payload.get('output'))}"
                if payload.get("action") is not None:
                    text += f" (action {payload['action']})"
        elif self.event.type == "node:error":
            error = payload.get("error")
            text += f": {error.get('message') if isinstance(error, Mapping) else error}"
        elif self.event.type == "context:change":
            text += f" {payload.get('op')} {payload.get('key')}"
            if payload.get("op") == "set":
                text += f" = {_short(payload.get('value'))}"
        elif self.event.type == "edge:evaluate":
            text += (f" {payload.get('source')} -> {payload.get('target')}: "
                     f"{payload.get('result')}")
        elif self.event.type == "workflow:finish":
            text += f" {payload.get('status')}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "event": event_to_dict(self.event),
                "context": self.context, "nodes": self.nodes}


def _short(value: Any, limit: int = 80) -> str:
    import json

    text = json.dumps(value, default=repr, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def replay(events: Iterable[FlowcraftEvent | Mapping[str, Any]],
           initial_context: Mapping[str, Any] | None = None) -> list[ReplayStep]:
    """The run's state after each event (events as objects or ``{"type", "payload"}`` dicts).

    Raises ``ValueError`` for an entry that is not an event."""
    context: dict[str, Any] = dict(initial_context or {})
    nodes: dict[str, NodeState] = {}
    steps: list[ReplayStep] = []
    for index, raw in enumerate(events):
        event = event_from_dict(raw)
        payload = event.payload
        node_id = payload.get("nodeId")
        kind = event.type
        if kind == "workflow:start" and isinstance(payload.get("context"), Mapping):
            context = dict(payload["context"])
            for known, state in _states_from_records(context).items():
                nodes.setdefault(known, state)
        elif kind == "node:start" and isinstance(node_id, str):
            nodes[node_id] = "running"
        elif kind == "node:finish" and isinstance(node_id, str):
            if "awaiting" in payload:
                nodes[node_id] = "awaiting"
                ids = list(context.get(AWAITING_IDS_KEY) or [])
                if node_id not in ids:
                    ids.append(node_id)
                context[AWAITING_IDS_KEY] = ids
                context[AWAITING_DETAILS_KEY] = {**(context.get(AWAITING_DETAILS_KEY) or {}),
                                                 node_id: payload["awaiting"]}
            else:
                nodes[node_id] = "completed"
                context[OUTPUTS_PREFIX + node_id] = payload.get("output")
                _clear_awaiting(context, node_id)
        elif kind == "node:error" and isinstance(node_id, str):
            nodes[node_id] = "failed"
        elif kind == "node:skipped" and isinstance(node_id, str):
            nodes[node_id] = "skipped"
        elif kind == "context:change" and isinstance(payload.get("key"), str):
            if payload.get("op") == "delete":
                context.pop(payload["key"], None)
            else:
                context[payload["key"]] = payload.get("value")
        steps.append(ReplayStep(index, event, dict(context), dict(nodes)))
    return steps


def _clear_awaiting(context: dict[str, Any], node_id: str) -> None:
    ids = [i for i in (context.get(AWAITING_IDS_KEY) or []) if i != node_id]
    details = {k: v for k, v in (context.get(AWAITING_DETAILS_KEY) or {}).items()
               if k != node_id}
    if ids:
        context[AWAITING_IDS_KEY] = ids
        context[AWAITING_DETAILS_KEY] = details
    else:
        context.pop(AWAITING_IDS_KEY, None)
        context.pop(AWAITING_DETAILS_KEY, None)


def _states_from_records(data: Mapping[str, Any]) -> dict[str, NodeState]:
    states: dict[str, NodeState] = {}
    for key, value in data.items():
        if key.startswith(RECORD_PREFIX) and isinstance(value, Mapping):
            states[key[len(RECORD_PREFIX):]] = (
                "skipped" if value.get("skipped") else
                "failed" if value.get("failed") else "completed")
    for node_id in data.get(AWAITING_IDS_KEY) or []:
        states[node_id] = "awaiting"
    return states


def events_from_context(data: Mapping[str, Any], run_id: str = "") -> list[FlowcraftEvent]:
    """The events a stored run context stands for, in commit order (see the module doc).

    A context without routing records (a public view, as ``flowcraft run --json`` prints)
    yields one ``node:finish`` per ``_outputs.<id>`` in document order."""
    records: list[tuple[float, int, str, Mapping[str, Any]]] = []
    last = float("-inf")
    for position, (key, value) in enumerate(data.items()):
        if key.startswith(RECORD_PREFIX) and isinstance(value, Mapping):
            at = value.get("t")
            if isinstance(at, int | float) and not isinstance(at, bool):
                last = float(at)
            records.append((last, position, key[len(RECORD_PREFIX):], value))
    records.sort(key=lambda entry: (entry[0], entry[1]))
    ordered = [(node_id, record) for _, _, node_id, record in records]
    if not ordered:
        ordered = [(key[len(OUTPUTS_PREFIX):], {}) for key in data
                   if key.startswith(OUTPUTS_PREFIX)]
    awaiting = [i for i in (data.get(AWAITING_IDS_KEY) or []) if isinstance(i, str)]
    start = {
        key: value for key, value in public_view(data).items()
        if not key.startswith((OUTPUTS_PREFIX, INPUTS_PREFIX))
        and key not in (AWAITING_IDS_KEY, AWAITING_DETAILS_KEY)
        and not key.startswith(INTERNAL_PREFIX)
    }
    base = {"runId": run_id}
    events = [FlowcraftEvent("workflow:start", {**base, "context": start})]
    for node_id, record in ordered:
        meta = {k: record[k] for k in ("n", "t") if k in record}
        if INPUTS_PREFIX + node_id in data:
            events.append(FlowcraftEvent("context:change", {
                **base, "nodeId": node_id, "op": "set", "key": INPUTS_PREFIX + node_id,
                "value": data[INPUTS_PREFIX + node_id]}))
        if record.get("skipped"):
            events.append(FlowcraftEvent("node:skipped", {**base, "nodeId": node_id, **meta}))
        elif record.get("failed"):
            events.append(FlowcraftEvent("node:error", {
                **base, "nodeId": node_id, **meta,
                "error": {"nodeId": node_id, "message": record.get("error", "")}}))
        else:
            finish = {**base, "nodeId": node_id, "output": data.get(OUTPUTS_PREFIX + node_id),
                      **meta}
            if record.get("action") is not None:
                finish["action"] = record["action"]
            events.append(FlowcraftEvent("node:finish", finish))
    details = data.get(AWAITING_DETAILS_KEY) or {}
    for node_id in awaiting:
        events.append(FlowcraftEvent("node:finish", {
            **base, "nodeId": node_id, "awaiting": details.get(node_id) or {}}))
    return events


def replay_context(data: Mapping[str, Any], run_id: str = "") -> list[ReplayStep]:
    """:func:`replay` of a stored run context (``_flowcraft.node.*`` records and outputs)."""
    return replay(events_from_context(data, run_id))


def load_replay_source(value: Any) -> list[ReplayStep]:
    """Steps from a saved file's JSON: a list of events, ``{"events": [...]}``, a run
    context, or a result (``{"context": ...}`` or ``{"serializedContext": "..."}``)."""
    import json

    if isinstance(value, list):
        return replay(value)
    if not isinstance(value, Mapping):
        raise ValueError("expected a JSON list of events or a JSON object (a run context "
                         f"or result), not {type(value).__name__}")
    if isinstance(value.get("events"), list):
        return replay(value["events"])
    if isinstance(value.get("serializedContext"), str):
        return replay_context(json.loads(value["serializedContext"]),
                              str(value.get("runId") or ""))
    if isinstance(value.get("context"), Mapping):
        return replay_context(value["context"], str(value.get("runId") or ""))
    return replay_context(value)
