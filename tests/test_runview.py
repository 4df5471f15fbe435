"""``flowcraft.runview``: node states, run views and the layered layout, from stored records
alone (pure functions: no services)."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from flowcraft import WorkflowBlueprint
from flowcraft.runview import (
    NODE_STATES,
    layered_layout,
    node_states,
    parse_time,
    run_summary,
    run_view,
)

NOW = 1_800_000_000.0

PIPELINE = WorkflowBlueprint.model_validate({
    "id": "pipeline",
    "nodes": [{"id": n, "uses": "step"} for n in ("fetch", "check", "ship", "refund", "notify")]
    + [{"id": "approve", "uses": "wait"},
       {"id": "report", "uses": "step", "inputs": {"total": "fetch.total"}}],
    "edges": [
        {"source": "fetch", "target": "check"},
        {"source": "check", "target": "ship", "action": "ok"},
        {"source": "check", "target": "refund", "condition": "result.output.bad"},
        {"source": "ship", "target": "notify"},
        {"source": "refund", "target": "notify"},
        {"source": "fetch", "target": "approve"},
        {"source": "fetch", "target": "report"},
    ],
})


def states(data: dict, **kwargs: object) -> dict[str, str]:
    return {k: v.state for k, v in node_states(PIPELINE, data, now=NOW, **kwargs).items()}


def test_a_fresh_run_is_all_pending() -> None:
    assert set(states({}).values()) == {"pending"}
    assert set(states(None).values()) == {"pending"}  # type: ignore[arg-type]


def test_each_stored_record_maps_to_its_state() -> None:
    data = {
        "_flowcraft.node.fetch": {"n": 1, "taken": [0, 1, 2]},
        "_outputs.fetch": {"total": 12},
        "_flowcraft.node.check": {"n": 1, "taken": [0], "action": "ok"},
        "_flowcraft.node.refund": {"n": 1, "skipped": True},
        "_flowcraft.lock.ship": {"owner": "host:1:abc/1234", "n": 0, "expires": NOW + 30},
        "_inputs.ship": {"checked": True},
        "_awaitingNodeIds": ["approve"],
        "_awaitingDetails": {"approve": {"reason": "wait", "iteration": 0}},
        "_flowcraft.node.report": {"n": 1, "failed": True, "error": "boom"},
    }
    views = node_states(PIPELINE, data, now=NOW)
    assert {k: v.state for k, v in views.items()} == {
        "fetch": "done", "check": "done", "ship": "running", "refund": "skipped",
        "notify": "pending", "approve": "awaiting", "report": "failed",
    }
    assert views["ship"].lease_owner == "host:1:abc/1234"
    assert views["ship"].input == {"checked": True}
    assert views["fetch"].output == {"total": 12}
    assert views["check"].action == "ok"
    assert views["report"].error == "boom"
    assert views["report"].input == {"total": 12}  # explicit inputs, read as the node read them
    assert views["approve"].awaiting == {"reason": "wait", "iteration": 0}
    assert views["notify"].lease_owner is None


def test_an_expired_lease_is_a_pending_node_not_a_running_one() -> None:
    data = {"_flowcraft.lock.fetch": {"owner": "dead", "n": 0, "expires": NOW - 1}}
    view = node_states(PIPELINE, data, now=NOW)["fetch"]
    assert (view.state, view.lease_owner) == ("pending", None)


def test_a_live_lease_beats_an_earlier_iterations_record() -> None:
    # In a loop the node completed iteration 0 and now runs iteration 1.
    data = {"_flowcraft.node.fetch": {"n": 1, "taken": [0]},
            "_flowcraft.lock.fetch": {"owner": "w", "n": 1, "expires": NOW + 5}}
    assert states(data)["fetch"] == "running"


def test_the_failed_node_carries_the_runs_error_and_attempts() -> None:
    data = {
        "_flowcraft.node.check": {"n": 1, "failed": True, "error": "card declined"},
        "_flowcraft.run": {"status": "failed", "reason": "node 'check' failed: card declined",
                           "error": {"nodeId": "check", "message": "card declined",
                                     "attempt": 3}},
    }
    status = {"status": "failed", "failedNodeId": "check",
              "error": "node 'check' failed: card declined"}
    view = run_view(PIPELINE, data, status, run_id="r", now=NOW)
    assert view.nodes["check"].state == "failed"
    assert view.nodes["check"].error == "card declined"
    assert view.nodes["check"].attempts == 3
    assert view.errors == ("node 'check' failed: card declined",)


def test_nodes_added_at_run_time_and_unknown_to_the_blueprint_are_shown() -> None:
    data = {
        "_flowcraft.dynamic.fetch": {"nodes": [{"id": "extra", "uses": "step"}],
                                     "edges": [{"source": "fetch", "target": "extra"}]},
        "_flowcraft.node.extra": {"n": 1, "taken": []},
        "_outputs.gone": 1,
    }
    view = run_view(PIPELINE, data, {"status": "running"}, run_id="r", now=NOW)
    assert view.nodes["extra"].state == "done"
    assert view.nodes["gone"].state == "pending"
    assert {n.id for n in view.graph.nodes} >= {"extra", "gone"}
    assert any(e.source == "fetch" and e.target == "extra" for e in view.graph.edges)


def test_without_a_blueprint_the_view_shows_what_the_context_knows() -> None:
    data = {"_flowcraft.node.a": {"n": 1, "taken": []}, "_outputs.a": 1}
    view = run_view(None, data, {"status": "completed", "blueprintId": "gone"}, run_id="r")
    assert list(view.nodes) == ["a"]
    assert view.blueprint_id == "gone"


def test_edges_carry_labels_and_whether_they_were_taken() -> None:
    data = {"_flowcraft.node.check": {"n": 1, "taken": [0], "action": "ok"}}
    edges = {(e.source, e.target): e for e in run_view(PIPELINE, data, {}, now=NOW).graph.edges}
    assert edges["check", "ship"].label == "ok"
    assert edges["check", "ship"].taken
    assert edges["check", "refund"].label == "if result.output.bad"
    assert not edges["check", "refund"].taken


def test_timestamps_and_duration() -> None:
    status = {"runId": "r", "status": "completed", "blueprintId": "pipeline",
              "startedAt": "2027-01-15T08:00:00.000Z", "lastUpdated": "2027-01-15T08:00:02.500Z"}
    summary = run_summary(status, now=NOW)
    assert summary.duration_seconds == 2.5
    running = run_summary({**status, "status": "running"},
                          now=parse_time("2027-01-15T08:01:00Z"))
    assert running.duration_seconds == 60.0  # still running: up to now
    assert run_summary({"runId": "r", "status": "running"}).duration_seconds is None
    assert parse_time(1_800_000_000_000) == parse_time(1_800_000_000) == 1_800_000_000.0


def test_the_status_comes_from_the_context_when_the_status_write_was_lost() -> None:
    view = run_view(PIPELINE, {"_flowcraft.run": {"status": "failed", "reason": "x"}}, None,
                    run_id="r")
    assert view.status == "failed"
    assert view.errors == ("x",)


def test_a_view_is_plain_json_even_with_dynamodb_numbers() -> None:
    from decimal import Decimal

    data = {"_outputs.fetch": {"total": Decimal("12"), "rate": Decimal("0.5")},
            "_flowcraft.node.fetch": {"n": Decimal("1"), "taken": [Decimal("0")]}}
    text = json.dumps(run_view(PIPELINE, data, {"status": "running"}, now=NOW).to_dict())
    assert json.loads(text)["nodes"]["fetch"]["output"] == {"total": 12, "rate": 0.5}


# -- the layout ----------------------------------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[str], list[tuple[str, str]]]:
    size = draw(st.integers(1, 12))
    nodes = [f"n{i}" for i in range(size)]
    pairs = st.tuples(st.sampled_from(nodes), st.sampled_from(nodes))
    return nodes, draw(st.lists(pairs, max_size=30))


@settings(max_examples=200, deadline=None)
@given(graphs())
def test_layout_places_every_node_once_with_forward_edges_going_right(
    graph: tuple[list[str], list[tuple[str, str]]],
) -> None:
    nodes, edges = graph
    layers, order, back = layered_layout(nodes, edges)
    assert set(layers) == set(order) == set(nodes)
    positions = {(layers[n], order[n]) for n in nodes}
    assert len(positions) == len(nodes)  # no two nodes on one spot
    for source, target in edges:
        if (source, target) not in back and source != target:
            assert layers[source] < layers[target]
    # Rows within a layer are 0..k-1: nothing drawn off to the side.
    for layer in set(layers.values()):
        rows = sorted(order[n] for n in nodes if layers[n] == layer)
        assert rows == list(range(len(rows)))


def test_layout_of_a_dag_has_no_back_edges_and_layers_are_longest_paths() -> None:
    layers, _, back = layered_layout(["a", "b", "c", "d"],
                                     [("a", "b"), ("b", "c"), ("a", "c"), ("c", "d")])
    assert back == set()
    assert layers == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_layout_handles_long_chains_without_recursion_limits() -> None:
    nodes = [f"n{i}" for i in range(5000)]
    layers, _, _ = layered_layout(nodes, list(itertools.pairwise(nodes)))
    assert layers["n4999"] == 4999


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["fetch", "check", "ship", "refund", "notify"]),
                       st.sampled_from(["done", "skipped", "failed", "lease", "expired"])))
def test_every_node_gets_exactly_one_known_state(kinds: dict[str, str]) -> None:
    data: dict[str, object] = {}
    for node_id, kind in kinds.items():
        if kind == "done":
            data[f"_flowcraft.node.{node_id}"] = {"n": 1, "taken": []}
        elif kind == "skipped":
            data[f"_flowcraft.node.{node_id}"] = {"n": 1, "skipped": True}
        elif kind == "failed":
            data[f"_flowcraft.node.{node_id}"] = {"n": 1, "failed": True, "error": "e"}
        else:
            data[f"_flowcraft.lock.{node_id}"] = {
                "owner": "w", "expires": NOW + (5 if kind == "lease" else -5)}
    expected = {"done": "done", "skipped": "skipped", "failed": "failed", "lease": "running",
                "expired": "pending"}
    found = states(data)
    assert set(found.values()) <= set(NODE_STATES)
    for node_id, kind in kinds.items():
        assert found[node_id] == expected[kind]
