"""Counted joins: ``all`` joins decided from a count of their predecessors' commits.

:attr:`Graph.counted_joins` names the joins every predecessor always reaches by
completing; a worker's commit of such a predecessor adds to the join's arrival count and
returns it, so the commit need not read the whole run back, and the commit that completes
the count reads the run and decides the join from the records.

Here: which joins qualify (by example, and as a property checked against the in-memory
engine), that counting is exactly once under duplicated, shuffled delivery, and that a
join counted in the run's graph as first stored still runs when a predecessor adds
dynamic nodes in front of it.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from distributed_helpers import Cluster, Executions, comparable, meanwhile, oracle
from flowcraft import FlowRuntime, NodeContext, NodeResult, WorkflowBlueprint
from flowcraft.core.graph import Graph
from flowcraft.core.routing import read_record
from flowcraft.distributed.context import arrivals_key
from flowcraft.distributed.job import JobPayload


def graph(nodes: list[dict[str, Any]], edges: list[dict[str, Any]]) -> Graph:
    return Graph(WorkflowBlueprint.model_validate({"id": "g", "nodes": nodes, "edges": edges}))


def n(node_id: str, uses: str = "step", **config: Any) -> dict[str, Any]:
    return {"id": node_id, "uses": uses, **({"config": config} if config else {})}


def e(source: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"source": source, "target": target, **extra}


def test_counted_joins_are_the_all_joins_every_predecessor_always_reaches() -> None:
    fan = graph([n("s"), n("a"), n("b"), n("j")],
                [e("s", "a"), e("s", "b"), e("a", "j"), e("b", "j")])
    assert fan.counted_joins == {"j"}
    # A condition on an edge into the join, or on the way to a predecessor: not counted.
    assert not graph([n("s"), n("a"), n("b"), n("j")],
                     [e("s", "a"), e("s", "b"), e("a", "j", condition="false"),
                      e("b", "j")]).counted_joins
    assert not graph([n("s"), n("a"), n("b"), n("j")],
                     [e("s", "a", condition="true"), e("s", "b"), e("a", "j"),
                      e("b", "j")]).counted_joins
    # An action on any edge of a predecessor may steer it away from the join.
    assert not graph([n("s"), n("a"), n("b"), n("x"), n("j")],
                     [e("s", "a"), e("s", "b"), e("a", "j"), e("a", "x", action="other"),
                      e("b", "j")]).counted_joins
    # An ``any`` join, a batch-scatter predecessor, a loop: not counted.
    assert not graph([n("s"), n("a"), n("b"), n("j", joinStrategy="any")],
                     [e("s", "a"), e("s", "b"), e("a", "j"), e("b", "j")]).counted_joins
    assert not graph([n("s"), n("a", "batch-scatter"), n("b"), n("j")],
                     [e("s", "a"), e("s", "b"), e("a", "j"), e("b", "j")]).counted_joins
    assert not graph([n("s"), n("a"), n("b"), n("j")],
                     [e("s", "a"), e("s", "b"), e("a", "j"), e("b", "j"),
                      e("j", "s", condition="false")]).counted_joins
    # Joins further down count when everything before them always runs.
    deep = graph([n("s"), n("a"), n("b"), n("j"), n("c"), n("k")],
                 [e("s", "a"), e("s", "b"), e("a", "j"), e("b", "j"), e("j", "k"),
                  e("s", "c"), e("c", "k")])
    assert deep.counted_joins == {"j", "k"}


# -- the property: a counted join always runs, after all its predecessors completed -------------


@st.composite
def dags(draw: st.DrawFn) -> dict[str, Any]:
    """Random acyclic blueprints: edges go from lower to higher node numbers; some edges carry
    a condition that holds or not, some nodes are ``any`` joins, some edges have actions."""
    size = draw(st.integers(3, 9))
    nodes = [n(f"n{i}", joinStrategy="any") if draw(st.booleans()) and i > 1
             and draw(st.integers(0, 3)) == 0 else n(f"n{i}") for i in range(size)]
    edges: list[dict[str, Any]] = []
    for target in range(1, size):
        sources = draw(st.sets(st.integers(0, target - 1), min_size=1, max_size=3))
        for source in sorted(sources):
            extra: dict[str, Any] = {}
            kind = draw(st.integers(0, 5))
            if kind == 0:
                extra["condition"] = draw(st.sampled_from(["true", "false"]))
            elif kind == 1:
                extra["action"] = draw(st.sampled_from(["go", "stop"]))
            edges.append(e(f"n{source}", f"n{target}", **extra))
    return {"id": "prop", "nodes": nodes, "edges": edges}


@settings(max_examples=150, deadline=None)
@given(dags(), st.sampled_from([None, "go", "stop"]))
async def test_a_counted_join_runs_after_every_predecessor_completed(
        raw: dict[str, Any], action: str | None) -> None:
    blueprint = WorkflowBlueprint.model_validate(raw)
    counted = Graph(blueprint).counted_joins

    async def step(ctx: NodeContext) -> Any:
        return NodeResult(output=1, action=action)

    result = await FlowRuntime(registry={"step": step}).run(blueprint)
    assert result.status == "completed", result.errors
    data = json.loads(result.serialized_context)
    for join in counted:
        record = read_record(data, join)
        assert record is not None and not record.skipped, join
        for source in Graph(blueprint).forward_predecessors[join]:
            before = read_record(data, source)
            assert before is not None and not before.skipped and not before.failed, source


# -- distributed: exactly-once counting, and dynamic nodes in front of a counted join -----------


async def test_arrivals_are_counted_once_each_under_duplicated_shuffled_delivery() -> None:
    from distributed_helpers import LatentRunStore

    runs = Executions()
    width = 8
    bp = WorkflowBlueprint.model_validate({
        "id": "counted", "nodes": [n("s"), *(n(f"b{i}") for i in range(width)), n("j")],
        "edges": [*(e("s", f"b{i}") for i in range(width)),
                  *(e(f"b{i}", "j") for i in range(width))]})
    assert Graph(bp).counted_joins == {"j"}
    registry = {"step": runs.node(lambda ctx: ctx.node_id)}
    expected = await oracle(bp, registry, run_id="counted-1")
    runs.reset()
    store = LatentRunStore(3)
    async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True, seed=3,
                       store=store) as cluster:
        result = await cluster.run(bp, run_id="counted-1")
        await cluster.settle()
    assert result.status == "completed"
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    stored = store.items["counted-1"]
    assert stored[arrivals_key("j")] == width
    # The branches' commits did not read the run back: only the last arrival did.
    assert store.calls.get("load", 0) <= 3, store.calls


async def test_a_join_counted_before_dynamic_nodes_were_added_still_runs_once() -> None:
    """``x`` adds two nodes that lead to the join: the join then waits for them too (four
    predecessors instead of two), whatever each worker's copy of the run knew when it
    committed."""
    runs = Executions()
    bp = WorkflowBlueprint.model_validate({
        "id": "grows", "nodes": [n("s"), n("x", "grow"), n("y"), n("j", "sum")],
        "edges": [e("s", "x"), e("s", "y"), e("x", "j"), e("y", "j")]})
    assert Graph(bp).counted_joins == {"j"}

    async def grow(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return NodeResult(output=0, dynamic_nodes=[
            {"id": "d1", "uses": "step"}, {"id": "d2", "uses": "step"}])

    async def total(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return sorted(ctx.input)

    registry = {"step": runs.node(lambda ctx: ctx.node_id), "grow": grow, "sum": total}
    expected = await oracle(bp, registry, run_id="grows-1")
    assert expected.context["_outputs.j"] == ["d1", "d2", "x", "y"]
    for seed in range(3):
        runs.reset()
        async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True,
                           seed=seed) as cluster:
            result = await cluster.run(bp, run_id=f"grows-{seed}")
            await cluster.settle()
        assert result.status == "completed"
        assert result.context["_outputs.j"] == ["d1", "d2", "x", "y"]
        assert runs.counts == {"s": 1, "x": 1, "y": 1, "d1": 1, "d2": 1, "j": 1}


async def test_a_join_is_decided_with_the_nodes_added_while_its_predecessor_ran() -> None:
    """``y`` was claimed before ``x`` added ``d1`` and ``d2`` (which lead to the join too);
    ``x`` and ``d1`` finish while ``y`` runs. ``y``'s commit completes the count its own graph
    expects, and the join must then be decided with the nodes added meanwhile: it waits for
    ``d2``, and runs once with all four inputs."""
    seen: dict[str, Any] = {}

    async def step(ctx: NodeContext) -> Any:
        seen[ctx.node_id] = ctx.input
        return ctx.node_id

    async def grow(ctx: NodeContext) -> Any:
        return NodeResult(output="x", dynamic_nodes=[
            {"id": "d1", "uses": "step"}, {"id": "d2", "uses": "step"}])

    bp = WorkflowBlueprint.model_validate({
        "id": "late", "nodes": [n("s"), n("x", "grow"), n("y"), n("j")],
        "edges": [e("s", "x"), e("s", "y"), e("x", "j"), e("y", "j")]})
    async with Cluster([bp], {"step": step, "grow": grow}, workers=2, start=False,
                       local_continuation=False) as cluster:
        x, y = cluster.workers[0].algorithm, cluster.workers[1].algorithm
        run_id = await cluster.client.start_workflow(bp, {}, run_id="late-1")
        await x.handle_job(JobPayload(run_id, bp.id, "s", 0))
        async def x_and_d1() -> None:
            await x.handle_job(JobPayload(run_id, bp.id, "x", 0))
            await x.handle_job(JobPayload(run_id, bp.id, "d1", 0))

        async with meanwhile(y, "before_commit", "y", x_and_d1):
            await y.handle_job(JobPayload(run_id, bp.id, "y", 0))
        assert not [body for body in cluster.queue.bodies() if '"j"' in body]
        await x.handle_job(JobPayload(run_id, bp.id, "d2", 0))
        assert [body for body in cluster.queue.bodies() if '"j"' in body]
        await x.handle_job(JobPayload(run_id, bp.id, "j", 0))
        assert seen["j"] == {"x": "x", "y": "y", "d1": "d1", "d2": "d2"}
