"""Map ledgers on in-process workers: a large ``batch-scatter`` runs its items in chunk items
of their own, so the run's item does not grow with the map, and stays correct under
duplicate deliveries, crashes at every step of a chunk's job, lost messages and failures.
The same maps on the AWS and Azure stacks are in tests/test_map_ledger_clouds.py.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest

from distributed_helpers import Cluster, CrashPlan
from flowcraft import ContextTooLargeError, Flow, NodeContext
from flowcraft.distributed.context import (
    MAP_PREFIX,
    InMemoryDistributedContext,
    InMemoryRunStore,
)
from flowcraft.distributed.job import JobPayload
from flowcraft.distributed.ledger import (
    MapPlan,
    chunk_items_for,
    chunk_run_id,
)


class Items:
    """A map worker that counts its calls per item; ``fail`` names an item that raises."""

    def __init__(self, fail: int | None = None, write: bool = False,
                 delay: float = 0.0) -> None:
        self.calls: Counter[int] = Counter()
        self.fail = fail
        self.write = write
        self.delay = delay

    async def __call__(self, ctx: NodeContext) -> dict[str, Any]:
        item = ctx.input
        self.calls[item] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if item == self.fail:
            raise ValueError(f"item {item} is bad")
        if self.write:
            await ctx.context.set(f"seen_{item}", True)
        return {"item": item, "square": item * item}


def map_flow(items: Items, chunk_size: int | None = None) -> Flow:
    async def after(ctx: NodeContext) -> Any:
        return len(ctx.input)

    return (Flow("ledger-map")
            .batch("fan", items, input_key="items", output_key="results", chunk_size=chunk_size)
            .node("after", after)
            .edge("fan", "after"))


def expected(count: int) -> list[dict[str, int]]:
    return [{"item": i, "square": i * i} for i in range(count)]


def run_item_bytes(cluster: Cluster, run_id: str) -> int:
    return len(json.dumps(cluster.store.items[run_id], separators=(",", ":")))


async def test_a_large_map_keeps_its_items_out_of_the_run() -> None:
    items = Items()
    flow = map_flow(items)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2,
                       map_chunk_items=50) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(1000))},
                                   run_id="big-map", timeout=60)

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(1000)
    assert result.context["_outputs.after"] == 1000
    assert set(items.calls) == set(range(1000)) and max(items.calls.values()) == 1
    # No node per item, no marker left: the run's item holds the input and the results.
    assert not [key for key in result.context
                if "fan_scatter_worker_" in key or key.startswith(MAP_PREFIX)]
    chunks = [run_id for run_id in cluster.store.items if run_id.startswith("big-map~map~")]
    assert len(chunks) == 20
    assert all(len(cluster.store.items[c]["items"]) == 50 for c in chunks)


async def test_a_small_map_adds_one_node_per_item_as_in_memory() -> None:
    items = Items()
    flow = map_flow(items)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=1,
                       map_ledger_min_items=32) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(31))})

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(31)
    assert result.context["_outputs.fan_scatter_worker_30"] == {"item": 30, "square": 900}


async def test_run_item_size_does_not_grow_with_the_map() -> None:
    sizes = {}
    for count in (200, 2000):
        flow = map_flow(Items())
        async with Cluster([flow.to_blueprint()], flow.registry(), workers=1,
                           map_chunk_items=100) as cluster:
            run_id = await cluster.client.start_workflow(flow.to_blueprint(),
                                                         {"items": list(range(count))})
            # While the map runs the run's item holds its input and the marker only.
            peak = 0
            while (cluster.status(run_id) or "running") == "running":
                if run_id in cluster.store.items and any(
                        k.startswith(MAP_PREFIX) for k in cluster.store.items[run_id]):
                    peak = max(peak, run_item_bytes(cluster, run_id))
                await asyncio.sleep(0.002)
            sizes[count] = (peak, len(json.dumps(list(range(count)))))
    for _count, (peak, input_bytes) in sizes.items():
        assert 0 < peak < input_bytes + 1500, sizes


async def test_duplicate_deliveries_run_every_item_once() -> None:
    items = Items()
    flow = map_flow(items)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=3, duplicate=True,
                       shuffle=True, map_chunk_items=10) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(200))},
                                   timeout=60)
        await cluster.settle()

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(200)
    assert set(items.calls) == set(range(200)) and max(items.calls.values()) == 1


@pytest.mark.parametrize("step", ["chunk_before_commit", "chunk_after_commit"])
async def test_a_crash_in_a_chunks_job_loses_nothing(step: str) -> None:
    """The chunk's job dies before its commit (its items run again elsewhere after the lease)
    or after it (the redelivered job finds the chunk done and only counts it)."""
    items = Items()
    flow = map_flow(items)
    plan = CrashPlan().add(step, "fan_scatter", times=3)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2, crash_plan=plan,
                       map_chunk_items=20) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(100))},
                                   timeout=60)

    assert plan.exhausted
    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(100)
    assert set(items.calls) == set(range(100))
    if step == "chunk_after_commit":
        assert max(items.calls.values()) == 1  # committed chunks never run again


async def test_a_crash_between_the_maps_last_commit_and_its_sends_is_healed() -> None:
    """The job that finishes the map dies after the scatter's commit, before the gather's
    job is sent: the chunk's message comes back, finds the map finished, and sends what
    follows the scatter."""
    items = Items()
    flow = map_flow(items)
    plan = CrashPlan().add("after_commit", "fan_scatter")
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2, crash_plan=plan,
                       map_chunk_items=10) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(40))},
                                   timeout=30)

    assert plan.exhausted
    assert result.status == "completed", result.errors
    assert result.context["_outputs.after"] == 40
    assert max(items.calls.values()) == 1


class LostChunkAnswers(InMemoryRunStore):
    """A store whose first commit of each chunk lands but answers nothing (an error after
    the write, as a retried request that then fails its condition)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: list[str] = []

    def context(self, run_id: str) -> InMemoryDistributedContext:
        store = self

        class Context(InMemoryDistributedContext):
            async def commit(self, *args: Any, **kwargs: Any) -> Any:
                committed = await super().commit(*args, **kwargs)
                if "~map~" in run_id and run_id not in store.lost and committed is not None:
                    store.lost.append(run_id)
                    return None
                return committed

        return Context(self, run_id)


async def test_a_chunk_commit_whose_answer_was_lost_still_counts() -> None:
    items = Items()
    flow = map_flow(items)
    store = LostChunkAnswers()
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2, store=store,
                       map_chunk_items=10) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(50))},
                                   timeout=30)

    assert len(store.lost) == 5
    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(50)
    assert max(items.calls.values()) == 1


async def test_a_chunk_job_naming_another_blueprint_is_dropped() -> None:
    """The last chunk's own message is lost; a job for that chunk naming another blueprint
    (one the workers have) does not run it: the map waits until reconcile sends the chunk
    again, under the run's own blueprint."""
    items = Items()
    flow = map_flow(items)
    other_flow = Flow("other-bp").node("x", lambda ctx: 1)
    async with Cluster([flow.to_blueprint(), other_flow.to_blueprint()],
                       {**flow.registry(), **other_flow.registry()}, workers=2,
                       map_chunk_items=10) as cluster:
        original = cluster.queue.send
        lost: list[str] = []

        async def lossy(bodies: list[str], *args: Any, **kwargs: Any) -> None:
            kept = []
            for body in bodies:  # the first message of chunk 4 is lost
                if json.loads(body).get("chunk") == 4 and not lost:
                    lost.append(body)
                else:
                    kept.append(body)
            await original(kept, *args, **kwargs)

        cluster.queue.send = lossy  # type: ignore[method-assign]
        run_id = await cluster.client.start_workflow(flow.to_blueprint(),
                                                     {"items": list(range(50))})
        await cluster.settle()
        forged = JobPayload(run_id, "other-bp", "fan_scatter", 0, chunk=4)
        await original([forged.to_json()])
        await cluster.settle()
        assert cluster.status(run_id) == "running"
        assert not {40, 41, 42, 43, 44, 45, 46, 47, 48, 49} & set(items.calls)
        await cluster.client.reconcile(run_id)
        result = await cluster.client.wait_for_result(run_id, timeout=30, poll_interval=0.02)

    assert lost
    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(50)
    assert max(items.calls.values()) == 1


class SmallItems(InMemoryRunStore):
    """A store whose chunk items hold at most ``limit`` bytes of JSON (the run's own item
    is not limited here: with a payload store it holds a reference to the list)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def context(self, run_id: str) -> InMemoryDistributedContext:
        store = self

        class Context(InMemoryDistributedContext):
            async def create(self, initial: Any) -> None:
                size = len(json.dumps(initial))
                if "~map~" in run_id and size > store.limit:
                    raise ContextTooLargeError(run_id, size, store.limit, "test")
                await super().create(initial)

        return Context(self, run_id)


async def test_a_chunk_too_large_to_store_fails_the_scatter_saying_so() -> None:
    items = Items()
    flow = map_flow(items, chunk_size=50)
    store = SmallItems(limit=100_000)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=1,
                       store=store) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": ["x" * 4000] * 50})

    assert result.status == "failed"
    assert [error.node_id for error in result.errors] == ["fan_scatter"]
    assert "its map could not be stored" in result.errors[0].message
    assert "over the test item limit" in result.errors[0].message
    assert not items.calls


async def test_a_chunk_job_out_of_range_is_dropped_and_the_map_completes() -> None:
    items = Items(delay=0.005)
    flow = map_flow(items)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2,
                       map_chunk_items=10) as cluster:
        run_id = await cluster.client.start_workflow(flow.to_blueprint(),
                                                     {"items": list(range(50))})
        for _ in range(5000):  # until the map runs
            if MAP_PREFIX + "fan_scatter" in cluster.store.items[run_id]:
                break
            await asyncio.sleep(0.001)
        forged = [JobPayload(run_id, "ledger-map", "fan_scatter", 0, chunk=99),
                  JobPayload(run_id, "ledger-map", "after", 0, chunk=0)]
        await cluster.client.backend.queue.send(forged)
        result = await cluster.client.wait_for_result(run_id, timeout=30, poll_interval=0.02)
        await cluster.settle()

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(50)
    assert max(items.calls.values()) == 1
    assert not [r for r in cluster.store.items if r.startswith(f"{run_id}~map~") and
                r.endswith(("~99", "~map~after"))]


async def test_waves_run_one_chunk_at_a_time_in_item_order() -> None:
    running: list[int] = []
    peak = 0
    order: list[int] = []

    async def work(ctx: NodeContext) -> int:
        nonlocal peak
        running.append(ctx.input)
        peak = max(peak, len(running))
        order.append(ctx.input)
        await asyncio.sleep(0.002 * (ctx.input % 3))
        running.remove(ctx.input)
        return int(ctx.input) * 10

    flow = (Flow("waves").batch("fan", work, input_key="items", output_key="results",
                                chunk_size=40))
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=3,
                       concurrency=8) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(200))})

    assert result.status == "completed", result.errors
    assert result.context["results"] == [i * 10 for i in range(200)]
    assert peak <= 40
    # A wave starts only after the previous one: every item of wave k before any of k+1.
    waves = [item // 40 for item in order]
    assert waves == sorted(waves)


async def test_a_failing_item_fails_the_run_naming_its_worker_node() -> None:
    items = Items(fail=77)
    flow = map_flow(items)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2,
                       map_chunk_items=25) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(100))})

    assert result.status == "failed"
    assert [error.node_id for error in result.errors] == ["fan_scatter"]
    assert "fan_scatter_worker_77" in result.errors[0].message
    assert "item 77 is bad" in result.errors[0].message
    assert "_outputs.after" not in result.context


async def test_context_writes_of_the_workers_land_in_the_run() -> None:
    flow = map_flow(Items(write=True))
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2,
                       map_chunk_items=16) as cluster:
        result = await cluster.run(flow.to_blueprint(), {"items": list(range(64))})

    assert result.status == "completed", result.errors
    assert all(result.context[f"seen_{i}"] is True for i in range(64))


async def test_lost_chunk_messages_are_sent_again_by_reconcile() -> None:
    """Every chunk job is lost once sent (a crash between the scatter's commit and its
    sends): the run stands still until reconcile sends the scatter's job, which finds the
    map running and sends the chunks that are not done."""
    items = Items()
    flow = map_flow(items)
    async with Cluster([flow.to_blueprint()], flow.registry(), workers=2,
                       map_chunk_items=10) as cluster:
        queue = cluster.queue
        original = queue.send
        dropped: list[Any] = []

        async def lossy(bodies: list[str], *args: Any, **kwargs: Any) -> None:
            kept = []
            for body in bodies:  # the first message of each chunk is lost
                chunk = json.loads(body).get("chunk")
                if chunk is None or chunk in dropped:
                    kept.append(body)
                else:
                    dropped.append(chunk)
            await original(kept, *args, **kwargs)

        queue.send = lossy  # type: ignore[method-assign]
        run_id = await cluster.client.start_workflow(flow.to_blueprint(),
                                                     {"items": list(range(50))})
        await cluster.settle()
        assert cluster.status(run_id) == "running" and not items.calls
        assert sorted(dropped) == [0, 1, 2, 3, 4]
        await cluster.client.reconcile(run_id)
        result = await cluster.client.wait_for_result(run_id, timeout=30, poll_interval=0.02)

    assert result.status == "completed", result.errors
    assert result.context["results"] == expected(50)


def test_chunk_size_follows_the_items_size() -> None:
    assert chunk_items_for(list(range(1000)), 100) == 100
    big = ["x" * 1000] * 50
    assert chunk_items_for(big, 100) == 8
    assert chunk_items_for(["x" * 20_000], 100) == 1
    plan = MapPlan(list(range(101)), "w", "g", 10, False)
    assert plan.chunks == 11


def test_chunk_ids_are_safe_item_ids() -> None:
    run_id = chunk_run_id("run-1", "a/b?c#d\\e", 3, "0f3a9c2e", 7)
    assert run_id.startswith("run-1~map~") and run_id.endswith("~3~0f3a9c2e~7")
    assert not set("/?#\\") & set(run_id)


def test_a_chunk_job_names_its_chunk_on_the_wire() -> None:
    from flowcraft.distributed.job import JobPayload, parse_job

    job = JobPayload("r", "bp", "fan_scatter", 2, chunk=7)
    assert json.loads(job.to_json())["chunk"] == 7
    assert parse_job(job.to_json()) == job
    assert job.key != JobPayload("r", "bp", "fan_scatter", 2).key
    assert "chunk" not in JobPayload("r", "bp", "n").to_dict()


@pytest.mark.parametrize("chunk", [-1, "3", True, 1.5])
def test_a_malformed_chunk_field_is_an_invalid_job(chunk: Any) -> None:
    from flowcraft.distributed.job import parse_job
    from flowcraft.errors import InvalidJobError

    body = json.dumps({"runId": "r", "blueprintId": "bp", "nodeId": "n", "chunk": chunk})
    with pytest.raises(InvalidJobError, match="chunk must be a non-negative integer"):
        parse_job(body)
