"""What keeps large in-memory runs small and fast: the graph's own index of the blueprint
(it must agree with the blueprint analysis on every graph), routing records kept once, and
finished runs freed at once (no reference cycle holding a run's context until a garbage
collection)."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Mapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcraft import FlowRuntime, WorkflowBlueprint
from flowcraft.analysis import find_cycles, start_node_ids, terminal_node_ids
from flowcraft.core.graph import Graph
from flowcraft.core.routing import (
    completed_record,
    read_record,
    record_key,
    shared_completed_record,
)
from flowcraft.runtime.runtime import _InMemoryRun


@st.composite
def blueprints(draw: st.DrawFn) -> WorkflowBlueprint:
    """Small graphs of every kind: DAGs, cycles, self-loops, parallel edges, islands, and
    fallback-only nodes."""
    count = draw(st.integers(1, 7))
    ids = [f"n{i}" for i in range(count)]
    pairs = draw(st.lists(st.tuples(st.sampled_from(ids), st.sampled_from(ids)), max_size=12))
    nodes: list[dict[str, Any]] = [{"id": node_id, "uses": "step"} for node_id in ids]
    if count > 1 and draw(st.booleans()):
        nodes[0]["config"] = {"fallback": ids[-1]}
    edges = [{"source": source, "target": target} for source, target in pairs]
    return WorkflowBlueprint.model_validate({"id": "g", "nodes": nodes, "edges": edges})


@given(blueprints())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_graph_index_agrees_with_the_blueprint_analysis(bp: WorkflowBlueprint) -> None:
    graph = Graph(bp)
    cycles = find_cycles(bp)
    assert graph.start_node_ids == start_node_ids(bp, cycles)
    assert graph.terminal_node_ids == terminal_node_ids(bp)
    assert bool(graph.strongly_connected) == bool(cycles)
    for node in bp.nodes:
        assert list(graph.outgoing[node.id]) == [e for e in bp.edges if e.source == node.id]
        assert list(graph.incoming[node.id]) == [e for e in bp.edges if e.target == node.id]
        for edge in bp.edges:
            if edge.source == node.id:
                expected = tuple(i for i, e in enumerate(graph.outgoing[node.id])
                                 if e.target == edge.target)
                assert graph.edge_indices(node.id, edge.target) == expected


def test_a_wide_fan_out_indexes_its_edges_by_target() -> None:
    width = 40  # above the scan limit
    bp = WorkflowBlueprint.model_validate({
        "id": "fan", "nodes": [{"id": "s", "uses": "step"}]
        + [{"id": f"b{i}", "uses": "step"} for i in range(width)],
        "edges": [{"source": "s", "target": f"b{i % 20}"} for i in range(width)]})
    graph = Graph(bp)
    assert graph.edge_indices("s", "b3") == (3, 23)
    assert graph.edge_indices("s", "b19") == (19, 39)
    assert graph.edge_indices("s", "nowhere") == ()


def test_equal_records_are_one_object_in_memory_but_never_for_workers() -> None:
    assert shared_completed_record(0, [0], None) is shared_completed_record(0, [0], None)
    assert shared_completed_record(0, [0], "ok") is not shared_completed_record(0, [0], None)
    # Workers write commit details into their records: each must be its own dict.
    assert completed_record(0, [0], None) is not completed_record(0, [0], None)


async def step(ctx: Any) -> Any:
    value = ctx.input
    return sum(value.values()) if isinstance(value, Mapping) else (value or 0) + 1


def diamond() -> WorkflowBlueprint:
    return WorkflowBlueprint.model_validate({
        "id": "diamond", "nodes": [{"id": f"n{i}", "uses": "step"} for i in range(5)],
        "edges": [{"source": "n0", "target": f"n{i}"} for i in (1, 2, 3)]
        + [{"source": f"n{i}", "target": "n4"} for i in (1, 2, 3)]})


def test_a_run_shares_its_records_and_reports_them_intact() -> None:
    result = asyncio.run(FlowRuntime(registry={"step": step}).run(diamond(), {}))
    assert result.status == "completed"
    assert result.context["_outputs.n4"] == 6
    stored = json.loads(result.serialized_context)
    assert stored[record_key("n1")] == {"n": 1, "taken": [0]}
    assert stored[record_key("n0")] == {"n": 1, "taken": [0, 1, 2]}


def test_a_finished_run_is_freed_without_a_garbage_collection() -> None:
    async def main() -> int:
        runtime = FlowRuntime(registry={"step": step})
        bp = diamond()
        gc.collect()
        gc.disable()
        try:
            for _ in range(50):
                result = await runtime.run(bp, {})
                assert result.status == "completed"
            return sum(1 for obj in gc.get_objects() if type(obj) is _InMemoryRun)
        finally:
            gc.enable()

    assert asyncio.run(main()) == 0


def test_records_read_back_from_a_serialized_context_match() -> None:
    result = asyncio.run(FlowRuntime(registry={"step": step}).run(diamond(), {}))
    data = json.loads(result.serialized_context)
    record = read_record(data, "n0")
    assert record is not None and record.taken == (0, 1, 2) and record.count == 1
