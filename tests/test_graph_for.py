"""``graph_for``: the graph of a run with the dynamic nodes its context holds. Workers call it
for every job, so it keeps the graphs it built; what it returns must always match the
additions in the context it is given."""

from __future__ import annotations

from typing import Any

from flowcraft import WorkflowBlueprint
from flowcraft.core.graph import DYNAMIC_PREFIX, Graph, dynamic_addition, graph_for


def base() -> Graph:
    return Graph(WorkflowBlueprint.model_validate({
        "id": "g", "nodes": [{"id": "scatter", "uses": "x"}, {"id": "gather", "uses": "x"}],
        "edges": [{"source": "scatter", "target": "gather"}]}))


def context_with(graph: Graph, count: int) -> dict[str, Any]:
    nodes = [{"id": f"w{i}", "uses": "x"} for i in range(count)]
    return {DYNAMIC_PREFIX + "scatter": dynamic_addition(graph, "scatter", nodes)}


def test_equal_additions_give_the_same_graph_and_other_additions_another() -> None:
    graph = base()
    two = graph_for(graph, context_with(graph, 2))
    assert graph_for(graph, context_with(graph, 2)) is two  # built once, from equal JSON
    three = graph_for(graph, context_with(graph, 3))  # a loop re-adds other nodes
    assert three is not two
    assert set(two.nodes) == {"scatter", "gather", "w0", "w1"}
    assert set(three.nodes) == {"scatter", "gather", "w0", "w1", "w2"}
    assert graph_for(graph, {}) is graph


def test_a_graph_is_never_shared_between_base_graphs() -> None:
    first, second = base(), base()
    data = context_with(first, 2)
    assert graph_for(first, data).blueprint is first.blueprint
    assert graph_for(second, data).blueprint is second.blueprint
