"""Property tests of the in-memory runtime on random DAGs (routing, joins, skips).

The expected outcome is computed by a small, independent oracle from the routing rules,
never by the engine's own routing code.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcraft import FlowRuntime, InMemoryEventBus, NodeContext, NodeResult, WorkflowBlueprint

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def dag_edges(draw: st.DrawFn, max_nodes: int = 25) -> tuple[int, list[tuple[int, int]]]:
    """A node count and edges that only go from a lower to a higher index."""
    count = draw(st.integers(min_value=1, max_value=max_nodes))
    if count == 1:
        return count, []
    pairs = draw(st.lists(
        st.tuples(st.integers(0, count - 1), st.integers(0, count - 1)), max_size=count * 3,
    ))
    return count, [(min(a, b), max(a, b)) for a, b in pairs if a != b]


def node_id(index: int) -> str:
    return f"n{index}"


# -- property 1: unconditional DAGs -------------------------------------------------------


@PROPERTY_SETTINGS
@given(graph=dag_edges(), yields=st.lists(st.integers(0, 3), min_size=25, max_size=25))
def test_every_node_of_an_unconditional_dag_runs_once_after_its_predecessors(
    graph: tuple[int, list[tuple[int, int]]], yields: list[int]
) -> None:
    count, edges = graph
    log: list[tuple[str, str]] = []

    async def work(ctx: NodeContext) -> str:
        log.append(("start", ctx.node_id))
        for _ in range(ctx.params["yields"]):
            await asyncio.sleep(0)
        log.append(("end", ctx.node_id))
        return ctx.node_id

    bp = WorkflowBlueprint.model_validate({
        "id": "dag",
        "nodes": [{"id": node_id(i), "uses": "work", "params": {"yields": yields[i]}}
                  for i in range(count)],
        "edges": [{"source": node_id(a), "target": node_id(b)} for a, b in edges],
    })

    result = asyncio.run(FlowRuntime(registry={"work": work}).run(bp))

    assert result.status == "completed", result.errors
    starts = [n for kind, n in log if kind == "start"]
    assert sorted(starts) == sorted(node_id(i) for i in range(count))  # each exactly once
    position = {event: index for index, event in enumerate(log)}
    for a, b in edges:
        assert position[("end", node_id(a))] < position[("start", node_id(b))]
    for b in range(count):
        sources = sorted({node_id(a) for a, target in edges if target == b})
        delivered = result.context.get(f"_inputs.{node_id(b)}")
        if len(sources) == 1:
            assert delivered == sources[0]
        elif sources:
            assert delivered == {source: source for source in sources}


# -- property 2: routing with actions, conditions and join strategies ------------------------

ACTIONS = [None, "x", "y"]

# (expression, the same rule in Python) over the source's output value and action.
CONDITIONS: list[tuple[str | None, Callable[[int, str | None], bool]]] = [
    (None, lambda value, action: True),
    ("result.output > 1", lambda value, action: value > 1),
    ("result.output == 0", lambda value, action: value == 0),
    ("result.output % 2 == 1", lambda value, action: value % 2 == 1),
    ("result.action == 'x'", lambda value, action: action == "x"),
    ("flag and result.output < 3", lambda value, action: value < 3),
    ("context['limit'] >= result.output", lambda value, action: value <= 2),
]


@dataclass(frozen=True)
class RoutedNode:
    value: int
    action: str | None
    join: str
    yields: int


@dataclass(frozen=True)
class RoutedEdge:
    source: int
    target: int
    action: str | None
    condition: int  # index into CONDITIONS


@st.composite
def routed_graphs(draw: st.DrawFn) -> tuple[list[RoutedNode], list[RoutedEdge]]:
    count, pairs = draw(dag_edges())
    nodes = [
        RoutedNode(
            value=draw(st.integers(0, 3)),
            action=draw(st.sampled_from(ACTIONS)),
            join=draw(st.sampled_from(["all", "any"])),
            yields=draw(st.integers(0, 3)),
        )
        for _ in range(count)
    ]
    edges = [
        RoutedEdge(a, b, draw(st.sampled_from(ACTIONS)),
                   draw(st.integers(0, len(CONDITIONS) - 1)))
        for a, b in pairs
    ]
    return nodes, edges


def taken_targets(node: RoutedNode, outgoing: list[RoutedEdge]) -> set[int]:
    """Routing: edges with the result's action, else the edges without an action;
    an edge with a condition only if the condition holds."""

    def holds(edge: RoutedEdge) -> bool:
        return CONDITIONS[edge.condition][1](node.value, node.action)

    chosen: list[RoutedEdge] = []
    if node.action is not None:
        chosen = [e for e in outgoing if e.action == node.action and holds(e)]
    if not chosen:
        chosen = [e for e in outgoing if e.action is None and holds(e)]
    return {edge.target for edge in chosen}


def oracle(
    nodes: list[RoutedNode], edges: list[RoutedEdge]
) -> tuple[set[int], dict[int, set[int]]]:
    """Which nodes run, and for each, which predecessors delivered to it. With fixed node
    outputs, reachability does not depend on timing: indices are a topological order."""
    outgoing: dict[int, list[RoutedEdge]] = defaultdict(list)
    predecessors: dict[int, set[int]] = defaultdict(set)
    for edge in edges:
        outgoing[edge.source].append(edge)
        predecessors[edge.target].add(edge.source)
    reached: set[int] = set()
    delivered_by: dict[int, set[int]] = {}
    taken: dict[int, set[int]] = {}
    for index, node in enumerate(nodes):
        delivering = {p for p in predecessors[index] if p in reached and index in taken[p]}
        # "all": every predecessor resolves eventually (runs or is skipped), then it runs if
        # one delivered; "any": it runs on the first delivery. Same set of nodes either way.
        if not predecessors[index] or delivering:
            reached.add(index)
            delivered_by[index] = delivering
            taken[index] = taken_targets(node, outgoing[index])
    return reached, delivered_by


@PROPERTY_SETTINGS
@given(graph=routed_graphs())
def test_routing_never_stalls_and_runs_exactly_the_reached_nodes(
    graph: tuple[list[RoutedNode], list[RoutedEdge]],
) -> None:
    nodes, edges = graph
    runs: list[tuple[str, Any]] = []

    async def work(ctx: NodeContext) -> NodeResult:
        runs.append((ctx.node_id, ctx.input))
        for _ in range(ctx.params["yields"]):
            await asyncio.sleep(0)
        return NodeResult(output=ctx.params["value"], action=ctx.params.get("action"))

    bp = WorkflowBlueprint.model_validate({
        "id": "routed",
        "nodes": [
            {"id": node_id(i), "uses": "work",
             "params": {"value": n.value, "action": n.action, "yields": n.yields},
             "config": {"joinStrategy": n.join}}
            for i, n in enumerate(nodes)
        ],
        "edges": [
            {"source": node_id(e.source), "target": node_id(e.target), "action": e.action,
             "condition": CONDITIONS[e.condition][0]}
            for e in edges
        ],
    })
    bus = InMemoryEventBus()

    result = asyncio.run(FlowRuntime(registry={"work": work}, event_bus=bus).run(
        bp, {"flag": True, "limit": 2}))

    reached, delivered_by = oracle(nodes, edges)
    assert result.status == "completed", result.errors
    ran = [name for name, _ in runs]
    assert len(ran) == len(set(ran)), f"a node ran twice: {ran}"
    assert set(ran) == {node_id(i) for i in reached}
    skipped = {event.payload["nodeId"] for event in bus.of_type("node:skipped")}
    assert skipped == {node_id(i) for i in range(len(nodes))} - set(ran)

    inputs = dict(runs)
    for index in reached:
        sources = {e.source for e in edges if e.target == index}
        expected = {node_id(p): nodes[p].value for p in delivered_by[index]}
        actual = inputs[node_id(index)]
        if not sources:
            assert actual is None
        elif len(sources) == 1:
            assert actual == next(iter(expected.values()))
        elif nodes[index].join == "all":
            assert actual == expected
        else:
            assert actual in expected.values()
