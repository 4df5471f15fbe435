"""``batch-scatter`` with ``chunkSize``: the workers go out in waves of at most that many, the
next wave once the previous one has finished, and the gather outputs every result in item
order. Each behaviour runs in memory and on in-process distributed workers, which must end
with the same context; ``follows``, the dynamic-node rule the waves are built on, is tested
on its own too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from distributed_helpers import Cluster, CrashPlan, comparable, drive, oracle
from flowcraft import (
    Flow,
    FlowcraftError,
    FlowRuntime,
    NodeContext,
    NodeResult,
    WorkflowBlueprint,
    WorkflowResult,
)
from flowcraft.blueprint import NodeDefinition
from flowcraft.core.graph import Graph, dynamic_addition
from flowcraft.distributed import InProcessAdapter

Runner = Callable[[WorkflowBlueprint, dict[str, Any], dict[str, Any]],
                  Awaitable[WorkflowResult]]


async def run_in_memory(bp: WorkflowBlueprint, registry: dict[str, Any],
                        context: dict[str, Any]) -> WorkflowResult:
    return await FlowRuntime(registry=registry).run(bp, context)


async def run_distributed(bp: WorkflowBlueprint, registry: dict[str, Any],
                          context: dict[str, Any]) -> WorkflowResult:
    async with Cluster([bp], registry, workers=3, concurrency=8) as cluster:
        return await cluster.run(bp, context, timeout=60)


BOTH = pytest.mark.parametrize("run", [run_in_memory, run_distributed],
                               ids=["memory", "distributed"])


class Workers:
    """A worker function that counts how many of its calls run at once and logs, in order,
    when each item starts and ends. Items of a wave finish out of order."""

    def __init__(self, delay: float = 0.01) -> None:
        self.delay = delay
        self.running = 0
        self.peak = 0
        self.log: list[tuple[str, int]] = []

    async def __call__(self, ctx: NodeContext) -> dict[str, Any]:
        item = ctx.input
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.log.append(("start", item))
        try:
            await asyncio.sleep(self.delay * (1 + (-item) % 3))
        finally:
            self.running -= 1
            self.log.append(("end", item))
        return {"item": item, "double": item * 2}

    def assert_waves(self, count: int, chunk_size: int) -> None:
        """Every item ran once, and none started before all of the previous wave ended."""
        position = {event: index for index, event in enumerate(self.log)}
        assert len(position) == len(self.log) == 2 * count
        for item in range(count):
            wave = item // chunk_size
            for earlier in range(wave * chunk_size - chunk_size, wave * chunk_size):
                if earlier >= 0:
                    assert position[("end", earlier)] < position[("start", item)], (item, earlier)


def chunked_flow(workers: Workers, chunk_size: int | None) -> Flow:
    async def after(ctx: NodeContext) -> Any:
        return ctx.input

    return (
        Flow("chunks")
        .batch("fan", workers, input_key="items", output_key="results", chunk_size=chunk_size)
        .node("after", after)
        .edge("fan", "after")
    )


def expected(count: int) -> list[dict[str, int]]:
    return [{"item": i, "double": 2 * i} for i in range(count)]


# -- in memory and distributed ------------------------------------------------------------------


@BOTH
async def test_waves_of_chunk_size_and_results_in_item_order(run: Runner) -> None:
    workers = Workers()
    flow = chunked_flow(workers, chunk_size=3)

    result = await run(flow.to_blueprint(), flow.registry(), {"items": list(range(10))})

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(10)
    assert result.context["_outputs.after"] == expected(10)
    assert workers.peak <= 3
    workers.assert_waves(10, 3)
    # The context keys the TypeScript library writes for a chunked batch.
    assert result.context["fan_scatter_currentIndex"] == 10
    assert result.context["fan_gather_hasMore"] is False
    assert result.context["fan_gather_allWorkerIds"] == [
        f"fan_scatter_worker_{i}" for i in range(10)]
    # Waves 2 to 4 were added by the wave before each.
    assert [result.context[f"_outputs.fan_scatter_chunk_{k}"]["workerNodeIds"]
            for k in (1, 2, 3)] == [
        [f"fan_scatter_worker_{i}" for i in range(3 * k, min(3 * k + 3, 10))] for k in (1, 2, 3)]
    assert "_outputs.fan_scatter_chunk_4" not in result.context


async def test_in_memory_a_wave_runs_chunk_size_workers_at_once() -> None:
    workers = Workers()
    flow = chunked_flow(workers, chunk_size=4)

    result = await run_in_memory(flow.to_blueprint(), flow.registry(), {"items": list(range(9))})

    assert result.status == "completed", result.errors
    assert workers.peak == 4  # in parallel within a wave, and never more


@BOTH
@pytest.mark.parametrize("count", [0, 1])
async def test_zero_and_one_item(run: Runner, count: int) -> None:
    workers = Workers()
    flow = chunked_flow(workers, chunk_size=2)

    result = await run(flow.to_blueprint(), flow.registry(), {"items": list(range(count))})

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(count)
    assert result.context["_outputs.after"] == expected(count)
    assert result.context["fan_scatter_currentIndex"] == count
    assert result.context["fan_gather_hasMore"] is False
    assert not any("_chunk_" in key for key in result.context)


@BOTH
async def test_a_chunk_larger_than_the_list_is_one_wave(run: Runner) -> None:
    workers = Workers()
    flow = chunked_flow(workers, chunk_size=50)

    result = await run(flow.to_blueprint(), flow.registry(), {"items": list(range(6))})

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(6)
    assert not any("_chunk_" in key for key in result.context)
    assert result.context["_outputs.fan_scatter"]["workerNodeIds"] == [
        f"fan_scatter_worker_{i}" for i in range(6)]
    assert result.context["_outputs.fan_scatter"]["hasMore"] is False


@BOTH
async def test_without_chunk_size_every_worker_goes_out_at_once(run: Runner) -> None:
    workers = Workers()
    flow = chunked_flow(workers, chunk_size=None)

    result = await run(flow.to_blueprint(), flow.registry(), {"items": list(range(6))})

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(6)
    assert "fan_scatter_currentIndex" not in result.context
    assert "fan_gather_hasMore" not in result.context
    assert result.context["_outputs.fan_scatter"] == {
        "gatherNodeId": "fan_gather", "items": list(range(6)),
        "workerNodeIds": [f"fan_scatter_worker_{i}" for i in range(6)],
    }
    if run is run_in_memory:
        assert workers.peak == 6


@BOTH
@pytest.mark.parametrize("chunk_size", [0, -2, 1.5, "3", True])
async def test_an_invalid_chunk_size_fails_the_scatter_naming_it(run: Runner,
                                                                 chunk_size: Any) -> None:
    bp = WorkflowBlueprint.model_validate({
        "id": "bad-chunks",
        "nodes": [
            {"id": "fan", "uses": "batch-scatter", "inputs": "items",
             "params": {"workerUsesKey": "work", "gatherNodeId": "collect",
                        "outputKey": "results", "chunkSize": chunk_size}},
            {"id": "collect", "uses": "batch-gather",
             "params": {"gatherNodeId": "collect", "outputKey": "results"}},
        ],
        "edges": [{"source": "fan", "target": "collect"}],
    })
    workers = Workers()

    result = await run(bp, {"work": workers}, {"items": [1, 2, 3]})

    assert result.status == "failed"
    assert [error.node_id for error in result.errors] == ["fan"]
    assert "batch-scatter node 'fan'" in result.errors[0].message
    assert "'chunkSize' must be a positive whole number" in result.errors[0].message
    assert repr(chunk_size) in result.errors[0].message
    assert workers.log == []


@BOTH
async def test_a_typescript_blueprint_with_chunk_size_runs_in_waves(run: Runner) -> None:
    # The shape the TypeScript builder writes for batch('fan', worker, {inputKey, outputKey,
    # chunkSize: 2}); a chunkSize of 2.0 (a JSON number) is 2.
    bp = WorkflowBlueprint.model_validate({
        "id": "ts-chunks",
        "nodes": [
            {"id": "fan_scatter", "uses": "batch-scatter", "inputs": "items",
             "params": {"workerUsesKey": "work", "outputKey": "out",
                        "gatherNodeId": "fan_gather", "chunkSize": 2.0}},
            {"id": "fan_gather", "uses": "batch-gather",
             "params": {"outputKey": "out", "gatherNodeId": "fan_gather"},
             "config": {"joinStrategy": "all"}},
        ],
        "edges": [{"source": "fan_scatter", "target": "fan_gather"}],
    })
    workers = Workers()

    result = await run(bp, {"work": workers}, {"items": list(range(5))})

    assert result.status == "completed", result.errors
    assert result.context["out"] == expected(5)
    assert workers.peak <= 2
    workers.assert_waves(5, 2)


@pytest.mark.parametrize("count,chunk_size", [(7, 2), (4, 4), (0, 3)])
async def test_distributed_run_ends_with_the_in_memory_context(count: int,
                                                               chunk_size: int) -> None:
    flow = chunked_flow(Workers(delay=0.002), chunk_size=chunk_size)
    bp = flow.to_blueprint()
    initial = {"items": list(range(count))}

    async with Cluster([bp], flow.registry(), workers=2, shuffle=True) as cluster:
        run_id = await cluster.client.start_workflow(bp, initial)
        distributed = await cluster.client.wait_for_result(run_id, timeout=60)
    in_memory = await oracle(bp, flow.registry(), initial, run_id=run_id)

    assert distributed.status == in_memory.status == "completed"
    assert comparable(distributed.context) == comparable(in_memory.context)


@pytest.mark.parametrize("step", ["after_run", "after_commit"])
async def test_a_worker_crash_at_a_wave_boundary_still_runs_each_item_once(step: str) -> None:
    workers = Workers(delay=0.002)
    flow = chunked_flow(workers, chunk_size=2)
    bp = flow.to_blueprint()
    plan = CrashPlan().add(step, "fan_scatter_chunk_1")

    async with Cluster([bp], flow.registry(), workers=2, crash_plan=plan,
                       lease_seconds=0.5) as cluster:
        run_id = await cluster.client.start_workflow(bp, {"items": list(range(6))})
        result, _ = await drive(cluster, run_id, timeout=60)

    assert plan.exhausted
    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(6)
    workers.assert_waves(6, 2)


async def run_on_one_worker(bp: WorkflowBlueprint, registry: dict[str, Any],
                            context: dict[str, Any]) -> WorkflowResult:
    runtime = FlowRuntime(blueprints={bp.id: bp}, registry=registry)
    worker = InProcessAdapter(runtime.options)
    await worker.start()
    try:
        run_id = await worker.start_workflow(bp, context)
        return await worker.wait_for_result(run_id, timeout=850, poll_interval=0.1)
    finally:
        await worker.stop()


@pytest.mark.parametrize(("run", "count", "chunk"), [
    (run_in_memory, 2000, 100),
    (run_on_one_worker, 2000, 100),
], ids=["memory", "distributed"])
async def test_a_large_map_in_waves(run: Runner, count: int, chunk: int) -> None:
    workers = Workers(delay=0.0005)
    flow = chunked_flow(workers, chunk_size=chunk)

    started = time.perf_counter()
    result = await run(flow.to_blueprint(), flow.registry(), {"items": list(range(count))})
    elapsed = time.perf_counter() - started

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(count)
    assert workers.peak <= chunk
    workers.assert_waves(count, chunk)
    if run is run_in_memory:
        # In memory the waves are dynamic nodes of the run.
        waves = sum(1 for key in result.context
                    if key.startswith("_outputs.fan_scatter_chunk_"))
        assert waves == count // chunk - 1
    else:
        # A worker runs a map this large as a ledger: its workers are not nodes of the run.
        assert not [key for key in result.context if "fan_scatter_worker_" in key
                    or key.startswith("_flowcraft.map.")]
    print(f"{count:,} items, chunk_size={chunk}, {run.__name__}: {elapsed:.2f} s")


# -- the builder -----------------------------------------------------------------------------------


def test_flow_batch_writes_chunk_size_only_when_given() -> None:
    async def work(ctx: NodeContext) -> Any:
        return ctx.input

    chunked = Flow("f").batch("fan", work, input_key="items", output_key="out", chunk_size=25)
    plain = Flow("f").batch("fan", work, input_key="items", output_key="out")

    assert chunked.to_blueprint().node("fan_scatter").to_dict()["params"] == {
        "workerUsesKey": "f.fan_worker", "outputKey": "out", "gatherNodeId": "fan_gather",
        "chunkSize": 25,
    }
    assert "chunkSize" not in plain.to_blueprint().node("fan_scatter").to_dict()["params"]
    assert (chunked.to_blueprint().node("fan_gather").to_dict()
            == plain.to_blueprint().node("fan_gather").to_dict())


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5, "10"])
def test_flow_batch_refuses_an_invalid_chunk_size(chunk_size: Any) -> None:
    with pytest.raises(FlowcraftError, match=r"batch-scatter node 'fan_scatter': 'chunkSize'"):
        Flow("f").batch("fan", "work", input_key="items", output_key="out",
                        chunk_size=chunk_size)


# -- follows: dynamic nodes that run after other dynamic nodes -------------------------------------


def test_a_dynamic_node_that_follows_others_takes_their_edges_to_the_successors() -> None:
    graph = Graph(WorkflowBlueprint.model_validate({
        "id": "g", "nodes": [{"id": "p", "uses": "x"}, {"id": "s", "uses": "x"}],
        "edges": [{"source": "p", "target": "s"}],
    }))
    nodes = [
        NodeDefinition(id="a", uses="x"),
        NodeDefinition(id="b", uses="x"),
        NodeDefinition.model_validate({"id": "c", "uses": "x", "follows": ["a", "b"]}),
        NodeDefinition(id="d", uses="x"),
    ]

    addition = dynamic_addition(graph, "p", nodes)

    assert addition["nodes"] == [{"id": n, "uses": "x"} for n in "abcd"]  # follows not kept
    assert sorted((e["source"], e["target"]) for e in addition["edges"]) == [
        ("a", "c"), ("b", "c"), ("c", "s"), ("d", "s"), ("p", "a"), ("p", "b"), ("p", "d")]
    extended = graph.extended([addition])
    assert extended.forward_predecessors["c"] == ("a", "b")
    assert set(extended.forward_predecessors["s"]) == {"p", "c", "d"}


@pytest.mark.parametrize("follows", [[], ["later"], ["nowhere"], "a", [1]])
def test_follows_must_name_nodes_added_before(follows: Any) -> None:
    graph = Graph(WorkflowBlueprint.model_validate({
        "id": "g", "nodes": [{"id": "p", "uses": "x"}]}))
    nodes = [
        NodeDefinition(id="a", uses="x"),
        NodeDefinition.model_validate({"id": "c", "uses": "x", "follows": follows}),
        NodeDefinition(id="later", uses="x"),
    ]

    with pytest.raises(FlowcraftError, match=r"node 'p' added node 'c' whose 'follows'"):
        dynamic_addition(graph, "p", nodes)


@BOTH
async def test_a_node_can_add_a_pipeline_of_dynamic_nodes(run: Runner) -> None:
    order: list[str] = []

    async def fan(ctx: NodeContext) -> NodeResult:
        return NodeResult(output="fan", dynamic_nodes=[
            NodeDefinition(id="left", uses="step"),
            NodeDefinition(id="right", uses="step"),
            NodeDefinition.model_validate(
                {"id": "join", "uses": "step", "follows": ["left", "right"]}),
        ])

    async def step(ctx: NodeContext) -> str:
        await asyncio.sleep(0.01 if ctx.node_id == "left" else 0)
        order.append(ctx.node_id)
        return ctx.node_id

    async def end(ctx: NodeContext) -> Any:
        order.append("end")
        return ctx.input

    bp = WorkflowBlueprint.model_validate({
        "id": "pipeline",
        "nodes": [{"id": "fan", "uses": "fan"}, {"id": "end", "uses": "end"}],
        "edges": [{"source": "fan", "target": "end"}],
    })

    result = await run(bp, {"fan": fan, "step": step, "end": end}, {})

    assert result.status == "completed", result.errors
    assert sorted(order[:2]) == ["left", "right"]
    assert order[2:] == ["join", "end"]
    assert result.context["_outputs.end"] == {"fan": "fan", "join": "join"}


@BOTH
async def test_a_malformed_follows_fails_the_node_that_added_it(run: Runner) -> None:
    async def fan(ctx: NodeContext) -> NodeResult:
        return NodeResult(output=None, dynamic_nodes=[
            NodeDefinition.model_validate({"id": "c", "uses": "step", "follows": ["ghost"]}),
        ])

    async def step(ctx: NodeContext) -> None:
        return None

    bp = WorkflowBlueprint.model_validate({"id": "bad-follows",
                                           "nodes": [{"id": "fan", "uses": "fan"}]})

    result = await run(bp, {"fan": fan, "step": step}, {})

    assert result.status == "failed"
    assert [error.node_id for error in result.errors] == ["fan"]
    assert "whose 'follows' is not a non-empty list" in result.errors[0].message
