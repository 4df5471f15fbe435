"""Branch items: a wide fan's branches keep their lease, record and output in items of
their own, and the run's item holds only a marker for them.

Here: which fans qualify; that a run with a wide fan completes exactly as in memory, under
duplicated, shuffled delivery with three workers, with every branch run once and the
run's item free of the branches' records; that a crash between a branch's commit and its
arrival is finished by the redelivered job (and its shared writes with it); and that a
worker that writes no marker keeps the branches in the run's item.
"""

from __future__ import annotations

from typing import Any

import pytest

from distributed_helpers import Cluster, CrashPlan, Executions, comparable, oracle
from flowcraft import NodeContext, WorkflowBlueprint
from flowcraft.core import graph as graph_module
from flowcraft.core.graph import Graph
from flowcraft.core.routing import record_key
from flowcraft.distributed.homes import branch_run_id, items_key

MIN = 8
"""The threshold these tests use (the real one makes for slow tests)."""
WIDTH = MIN + 3


@pytest.fixture(autouse=True)
def _narrow_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph_module, "WIDE_FAN_MIN_BRANCHES", MIN)


def n(node_id: str, uses: str = "step", **config: Any) -> dict[str, Any]:
    return {"id": node_id, "uses": uses, **({"config": config} if config else {})}


def e(source: str, target: str, **extra: Any) -> dict[str, Any]:
    return {"source": source, "target": target, **extra}


def fan(width: int = WIDTH, **branch_edge: Any) -> WorkflowBlueprint:
    return WorkflowBlueprint.model_validate({
        "id": "wide", "nodes": [n("s"), *(n(f"b{i}") for i in range(width)), n("j"), n("t")],
        "edges": [*(e("s", f"b{i}") for i in range(width)),
                  *(e(f"b{i}", "j", **branch_edge) for i in range(width)), e("j", "t")]})


def test_a_fan_is_wide_when_enough_plain_branches_lead_from_one_source_into_one_join() -> None:
    wide = Graph(fan()).plain_fans
    assert list(wide) == ["s"]
    assert wide["s"].join == "j" and wide["s"].branches == tuple(f"b{i}" for i in range(WIDTH))
    assert not Graph(fan(condition="true")).plain_fans  # a branch that may not arrive
    raw = fan().model_dump(by_alias=True, exclude_none=True)
    raw["nodes"][1] = n("b0", "wait")  # a branch that parks
    assert not Graph(WorkflowBlueprint.model_validate(raw)).plain_fans
    raw = fan().model_dump(by_alias=True, exclude_none=True)
    raw["edges"].append(e("s", "j"))  # the join has another way in
    assert not Graph(WorkflowBlueprint.model_validate(raw)).plain_fans


async def test_a_wide_fan_runs_once_per_branch_with_its_branches_in_their_own_items() -> None:
    runs = Executions()
    bp = fan()

    async def total(ctx: NodeContext) -> Any:
        runs.counts[ctx.node_id] = runs.counts.get(ctx.node_id, 0) + 1
        return sum(ctx.input.values()) if isinstance(ctx.input, dict) else (ctx.input or 0) + 1

    registry = {"step": total}
    expected = await oracle(bp, registry, run_id="wide-1")
    runs.reset()
    async with Cluster([bp], registry, workers=3, duplicate=True, shuffle=True,
                       seed=5) as cluster:
        result = await cluster.run(bp, run_id="wide-1")
        await cluster.settle()
        items = cluster.store.items
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.t"] == WIDTH * 2 + 1
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    run_item = items["wide-1"]
    assert items_key("s") in run_item
    assert not any(record_key(f"b{i}") in run_item for i in range(WIDTH))
    assert record_key("b7") in items[branch_run_id("wide-1", "s", 7)]


def counting(runs: Executions) -> Any:
    async def node(ctx: NodeContext) -> Any:
        runs.record(ctx)
        if ctx.node_id.startswith("b"):
            await ctx.context.set(f"seen_{ctx.node_id}", True)  # a shared write
        return sum(ctx.input.values()) if isinstance(ctx.input, dict) else (ctx.input or 0) + 1
    return node


async def test_a_branch_that_died_after_its_commit_is_counted_by_its_redelivered_job() -> None:
    """Some branches' workers die between the commit and the arrival (and the shared write):
    their redelivered jobs find them done, write the shared write, count them, and the
    last one starts the join; every node runs once."""
    runs = Executions()
    bp = fan()
    registry = {"step": counting(runs)}
    expected = await oracle(bp, registry, run_id="wide-crash")
    runs.reset()
    plan = CrashPlan()
    for index in (0, 4, WIDTH - 1):
        plan.add("after_commit", f"b{index}")
    async with Cluster([bp], registry, workers=2, lease_seconds=0.5,
                       crash_plan=plan) as cluster:
        result = await cluster.run(bp, run_id="wide-crash")
        await cluster.settle()
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert all(result.context[f"seen_b{index}"] for index in range(WIDTH))
    assert runs.counts == {node.id: 1 for node in bp.nodes}


async def test_a_worker_that_writes_lean_commits_off_keeps_the_branches_in_the_run() -> None:
    runs = Executions()
    bp = fan()
    registry = {"step": counting(runs)}
    async with Cluster([bp], registry, workers=2, lean_writes=False) as cluster:
        result = await cluster.run(bp, run_id="wide-plain")
        await cluster.settle()
        items = cluster.store.items
    assert result.status == "completed", result.errors
    assert items_key("s") not in items["wide-plain"]
    assert record_key("b3") in items["wide-plain"]
    assert not [run_id for run_id in items if "~fan~" in run_id]
    assert runs.counts == {node.id: 1 for node in bp.nodes}


async def test_a_shared_write_lost_after_the_branch_commit_is_written_by_the_redelivery(
) -> None:
    """The write of a branch's shared keys fails after its commit landed (a service down
    for a moment), and so does the job's second try when it reads back that the commit
    landed: the job's redelivery finds the branch done, writes them from the branch's item,
    and only then counts it."""
    from flowcraft.distributed.context import InMemoryDistributedContext, InMemoryRunStore

    failed: list[str] = []

    class FlakyContext(InMemoryDistributedContext):
        async def apply(self, operations: Any) -> Any:
            keys = [op.key for op in operations]
            if "seen_b2" in keys and len(failed) < 2:
                failed.append("seen_b2")
                raise ConnectionError("the run store is down for a moment")
            return await super().apply(operations)

    class FlakyStore(InMemoryRunStore):
        def context(self, run_id: str) -> InMemoryDistributedContext:
            return FlakyContext(self, run_id)

    runs = Executions()
    bp = fan()
    registry = {"step": counting(runs)}
    async with Cluster([bp], registry, workers=2, lease_seconds=0.5,
                       store=FlakyStore()) as cluster:
        result = await cluster.run(bp, run_id="wide-flaky")
        await cluster.settle()
    assert failed == ["seen_b2", "seen_b2"]
    assert result.status == "completed", result.errors
    assert all(result.context[f"seen_b{index}"] for index in range(WIDTH))
    assert runs.counts == {node.id: 1 for node in bp.nodes}


async def test_branches_claimed_without_a_copy_find_their_items_through_the_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No worker has a copy of the run (as when the source ran on another worker): each
    branch's claim of the run's item shows the marker, gives that lease back and claims the
    branch's item; nothing of the branches stays in the run's item."""
    from flowcraft.distributed.snapshots import RunSnapshots

    monkeypatch.setattr(RunSnapshots, "covering", lambda self, job, graph: None)
    runs = Executions()
    bp = fan()
    registry = {"step": counting(runs)}
    expected = await oracle(bp, registry, run_id="wide-cold")
    runs.reset()
    async with Cluster([bp], registry, workers=2) as cluster:
        result = await cluster.run(bp, run_id="wide-cold")
        await cluster.settle()
        items = cluster.store.items
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts == {node.id: 1 for node in bp.nodes}
    assert not [key for key in items["wide-cold"]
                if key.startswith(("_flowcraft.lock.b", "_flowcraft.attempts.b",
                                   "_flowcraft.node.b"))]
    assert record_key("b3") in items[branch_run_id("wide-cold", "s", 3)]


async def _stored_fan(store: Any, run_id: str) -> Any:
    """A run of :func:`fan` whose source has committed, with its marker: its context."""
    from flowcraft import PatchOperation
    from flowcraft.core.routing import output_key
    from flowcraft.distributed.homes import run_context

    context = run_context(store, run_id, Graph(fan()))
    await context.create({"user": 1})
    await context.apply([
        PatchOperation("set", items_key("s"), {"n": WIDTH, "join": "j"}),
        PatchOperation("set", output_key("s"), 5),
        PatchOperation("set", record_key("s"), {"n": 1, "taken": list(range(WIDTH))})])
    return context


async def test_a_branch_claimed_and_committed_from_a_copy_sees_the_whole_run_on_any_store(
) -> None:
    """A store may ignore the copy and answer with the item it wrote (Cosmos DB does): for a
    branch, that item is the branch's alone, and the answers must still be the whole run."""
    from flowcraft import PatchOperation
    from flowcraft.core.routing import output_key
    from flowcraft.distributed.context import (
        InMemoryDistributedContext,
        InMemoryRunStore,
        lock_key,
    )

    class IgnoresCopies(InMemoryDistributedContext):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            return await super().claim(*args, **{**kwargs, "base": None})

        async def commit(self, *args: Any, **kwargs: Any) -> Any:
            return await super().commit(*args, **{**kwargs, "base": None})

    class Store(InMemoryRunStore):
        def context(self, run_id: str) -> InMemoryDistributedContext:
            return IgnoresCopies(self, run_id)

    store = Store()
    context = await _stored_fan(store, "copies")
    copy = await context.load()
    claim = await context.claim("b3", 0, "w/1", 30, base=copy)
    assert claim.data is not None and claim.data[output_key("s")] == 5
    assert claim.data["user"] == 1 and lock_key("b3") in claim.data
    answer = await context.commit("b3", 0, "w/1", [
        PatchOperation("set", output_key("b3"), 6),
        PatchOperation("set", record_key("b3"), {"n": 1, "taken": [0]})], base=claim.data)
    assert answer is not None and answer[output_key("s")] == 5 and answer["user"] == 1
    assert answer[output_key("b3")] == 6 and lock_key("b3") not in answer
    assert record_key("b3") in store.items[branch_run_id("copies", "s", 3)]


async def test_reading_a_shared_key_reads_the_run_item_alone() -> None:
    """A long branch's cancellation check (``get`` of the run's state) costs one read, not
    one per branch; a read of the whole run reads every branch item."""
    from flowcraft.distributed.context import InMemoryRunStore

    store = InMemoryRunStore()
    context = await _stored_fan(store, "reads")
    for index in range(WIDTH):
        await store.context(branch_run_id("reads", "s", index)).create({})
    store.calls.clear()
    assert await context.get("_flowcraft.run") is None and await context.get("user") == 1
    assert store.calls == {"load": 2}
    store.calls.clear()
    await context.load()
    assert store.calls == {"load": 1 + WIDTH}
