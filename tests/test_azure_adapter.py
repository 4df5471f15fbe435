"""What only the Azure backend does, on real local services: Azurite (Queue Storage), a
Cosmos DB SQL API server and redis-server, started by the ``azure`` fixtures. No SDK is mocked.

Sections: provisioning; ``RedisCoordinationStore``'s real TTLs; ``CosmosDbContext``'s item
layout, partial patches and the ``_etag`` path; the worker (message encodings, the poison
queue, commits of parallel branches, Redis restarts); the reconciler's paged queries;
throttling.

What every backend does is tested once for all of them: tests/test_backends.py (workers and
clients), tests/test_run_store_contract.py (``CosmosDbContext``) and
tests/test_coordination_store.py (``RedisCoordinationStore``).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import time
import uuid
from typing import Any

import pytest

from azure_helpers import (
    containers,
    context_of,
    decode,
    items_with_id,
    make_adapter,
    peek,
    poison_client,
    receive_all,
    wait_for,
    wait_queue_empty,
    workers,
)
from distributed_helpers import Executions
from flowcraft import Flow, NodeContext, PatchOperation
from flowcraft.adapters.azure import (
    AzureNames,
    AzureQueueAdapter,
    CosmosDbContext,
    RedisCoordinationStore,
    create_azure_reconciler,
    provision_azure,
)
from flowcraft.adapters.azure._cosmos import (
    literal,
    with_throttling_retries,
)
from flowcraft.distributed.backend import Backend
from flowcraft.distributed.coordination import poison_key


def chain(flow_id: str, runs: Executions, *node_ids: str) -> Flow:
    flow = Flow(flow_id)
    for node_id in node_ids:
        flow.node(node_id, runs.node())
    for a, b in itertools.pairwise(node_ids):
        flow.edge(a, b)
    return flow


# =============================================================================================
# Provisioning
# =============================================================================================


async def test_provision_creates_queue_database_and_containers_idempotently(azure: Any) -> None:
    suffix = uuid.uuid4().hex[:8]
    names = AzureNames(f"prov-{suffix}", f"provdb-{suffix}", "ctx", "sts")
    try:
        first = await provision_azure(azure.queue_service, azure.cosmos, names)
        assert sorted(first["created"]) == sorted([
            f"queue prov-{suffix}", f"queue prov-{suffix}-poison", f"database provdb-{suffix}",
            f"container provdb-{suffix}/ctx", f"container provdb-{suffix}/sts"])
        for queue_name in (names.queue_name, f"{names.queue_name}-poison"):
            await azure.queue_service.get_queue_client(queue_name).get_queue_properties()
        database = azure.cosmos.get_database_client(names.database)
        for container in ("ctx", "sts"):
            properties = await database.get_container_client(container).read()
            assert properties["partitionKey"]["paths"] == ["/runId"]
            assert properties["defaultTtl"] == -1  # items with a ttl (finished runs) expire
        again = await provision_azure(azure.queue_service, azure.cosmos, names)
        assert again["created"] == []
        assert again["queue"] == names.queue_name and again["database"] == names.database
    finally:
        await azure.cosmos.delete_database(names.database)
        for queue_name in (names.queue_name, f"{names.queue_name}-poison"):
            await azure.queue_service.delete_queue(queue_name)


async def test_provision_refuses_a_container_with_another_partition_key(azure: Any) -> None:
    from azure.cosmos import PartitionKey

    database = azure.cosmos.get_database_client(azure.database)
    await database.create_container("byid", partition_key=PartitionKey(path="/id"))
    names = AzureNames(azure.queue_name, azure.database, "byid", azure.status_container)
    with pytest.raises(RuntimeError, match=r"byid.*/id.*needs /runId"):
        await provision_azure(azure.queue_service, azure.cosmos, names)


def test_default_names_are_the_guides() -> None:
    assert AzureNames() == AzureNames("flowcraft-jobs", "flowcraft-db", "contexts", "statuses")


# =============================================================================================
# RedisCoordinationStore: Redis specifics
# =============================================================================================


async def test_redis_store_sets_real_ttls_and_counts_round_trips(azure: Any) -> None:
    store = RedisCoordinationStore(azure.redis)
    prefix = f"flowcraft:test:{uuid.uuid4().hex}:"
    assert await store.increment(prefix + "c", 100) == 1
    assert 0 < await azure.redis.ttl(prefix + "c") <= 100
    assert await store.set_if_not_exist(prefix + "s", "v", 50) is True
    assert 0 < await azure.redis.ttl(prefix + "s") <= 50
    assert await store.extend_ttl(prefix + "s", 500) is True
    assert 100 < await azure.redis.ttl(prefix + "s") <= 500
    assert await store.extend_ttl(prefix + "missing", 500) is False
    assert await store.join_add(prefix + "j", "a", 30) == 1
    assert await store.join_add(prefix + "j", "a", 30) == 1  # a redelivery counts once
    assert await store.join_add(prefix + "j", "b", 30) == 2
    assert await store.join_members(prefix + "j") == {"a", "b"}
    assert 0 < await azure.redis.ttl(prefix + "j") <= 30
    await store.delete(prefix + "s")
    assert await store.get(prefix + "s") is None
    assert store.calls["redis.join_add"] == 3 and store.calls["redis.increment"] == 1


# =============================================================================================
# CosmosDbContext
# =============================================================================================


SYSTEM = {"_rid", "_self", "_etag", "_attachments", "_ts"}


def new_context(azure: Any) -> CosmosDbContext:
    return context_of(azure, str(uuid.uuid4()))


ODD_KEYS = {
    "plain": 1, "camelCase": "x", "a/b": [1, 2], "t~x": {"n": None}, "with space": True,
    "Ünïcödé ✓": "ok", "_outputs.fetchUser": {"nested": {"deep": [1, {"x": 1.5}]}},
    "select": "not a query", "big": 2**53, "neg": -7, "empty": "", "quote\"d": "'\"",
}


async def test_context_item_holds_the_keys_at_the_top_level(azure: Any) -> None:
    """The item is ``{id, runId, <key>: <value>...}``: one item per run, in its own partition,
    the keys at the top level as the TypeScript library writes them; a key that would collide
    with the item's own properties is stored as ``~key`` (that every key round-trips is the
    run store contract's)."""
    context = new_context(azure)
    await context.create({"start": 0, "id": "mine"})
    for key, value in ODD_KEYS.items():
        await context.set(key, value)
    await context.patch([PatchOperation("set", "context", {"user": "Ada"}),
                         PatchOperation("set", "ttl", 5), PatchOperation("set", "~x", 1),
                         PatchOperation("delete", "camelCase")])
    raw = await items_with_id(containers(azure)[0], context.run_id)
    assert len(raw) == 1 and raw[0]["runId"] == context.run_id
    expected = {"start": 0, **ODD_KEYS}
    del expected["camelCase"]
    assert {k: v for k, v in raw[0].items() if k not in SYSTEM} == {
        "id": context.run_id, "runId": context.run_id, **expected, "~id": "mine",
        "~context": {"user": "Ada"}, "~ttl": 5, "~~x": 1}
    assert await context.load() == {**expected, "id": "mine", "context": {"user": "Ada"},
                                    "ttl": 5, "~x": 1}


async def test_context_patch_is_partial_and_leaves_other_keys_alone(azure: Any) -> None:
    context = new_context(azure)
    await context.create({"keep": 1, "drop": 2, "change": 3})
    other = context_of(azure, context.run_id)  # another worker's view of the same run
    await other.set("theirs", "t")
    await context.patch([PatchOperation("set", "change", 30), PatchOperation("delete", "drop"),
                         PatchOperation("set", "new", {"a": 1}),
                         PatchOperation("delete", "never-existed")])
    assert await other.to_dict() == {"keep": 1, "change": 30, "new": {"a": 1}, "theirs": "t"}


async def test_context_patch_over_ten_operations_uses_the_etag_path(azure: Any) -> None:
    context = new_context(azure)
    await context.create({f"old{i}": i for i in range(5)})
    operations = [PatchOperation("set", f"k{i}", i) for i in range(12)]
    operations += [PatchOperation("delete", f"old{i}") for i in range(3)]
    operations += [PatchOperation("set", "k0", "last write wins")]
    await context.patch(operations)
    expected = {"old3": 3, "old4": 4, **{f"k{i}": i for i in range(12)}}
    expected["k0"] = "last write wins"
    assert await context.to_dict() == expected


@pytest.mark.parametrize("keys_per_writer", [1, 12], ids=["patch", "etag"])
async def test_concurrent_writers_of_one_run_lose_nothing(azure: Any,
                                                          keys_per_writer: int) -> None:
    run_id = str(uuid.uuid4())
    await context_of(azure, run_id).create({})
    writers = 8

    async def write(w: int) -> None:
        # Each writer has its own context object, as separate workers would.
        await context_of(azure, run_id).patch(
            [PatchOperation("set", f"w{w}.k{k}", [w, k]) for k in range(keys_per_writer)])

    await asyncio.gather(*(write(w) for w in range(writers)))
    data = await context_of(azure, run_id).to_dict()
    assert data == {f"w{w}.k{k}": [w, k] for w in range(writers)
                    for k in range(keys_per_writer)}


def test_predicate_literals_survive_a_server_that_lower_cases_them() -> None:
    # The local Cosmos server lower-cases a patch's filter predicate before running it:
    # literals must not depend on letter case (nor contain the word "select").
    for text in ("fetchUser", "SELECT", "Ünï ✓", "a\"b\\c", "x\U0001F600y"):
        lit = literal(text)
        assert lit == lit.lower()
        assert json.loads(lit) == text
        assert "select" not in lit.lower()
    assert literal(3) == "3" and literal(1.5) == "1.5"


# =============================================================================================
# The worker
# =============================================================================================


async def test_our_messages_are_base64_json_and_plain_json_is_accepted(azure: Any) -> None:
    runs = Executions()
    flow = chain("encodings", runs, "a", "b")
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    [message] = await receive_all(azure.queue)
    content = message.content
    assert not content.lstrip().startswith("{")
    assert json.loads(base64.b64decode(content, validate=True)) == {
        "runId": run_id, "blueprintId": "encodings", "nodeId": "a"}
    # The same job as plain JSON text (what the TypeScript library's client sends) runs the same.
    await azure.queue.send_message(json.dumps({"runId": run_id, "blueprintId": "encodings",
                                               "nodeId": "a"}))
    async with workers(azure, [bp], flow.registry()) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"a": 1, "b": 1}
    assert [decode(m.body)["nodeId"] for m in worker.received] == ["a"]


async def test_message_received_too_often_moves_to_the_poison_queue(azure: Any) -> None:
    runs = Executions()
    flow = chain("crashy", runs, "a", "b")
    bp = flow.to_blueprint()
    # Every attempt at node a kills the job (as a worker crash would): the message comes
    # back after its visibility timeout, once per attempt, until it is poison.
    async with workers(azure, [bp], flow.registry(), lease_seconds=1, max_receive_count=2,
                       crash_at={("before_run", "a")}) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
    assert result.status == "failed" and runs.counts == {}
    assert [m.receive_count for m in worker.received_jobs("a")] == [1, 2, 3]
    status = await worker.get_run_status(run_id)
    assert status["failedNodeId"] == "a" and "attempted 3 times" in status["error"]
    poisoned = await receive_all(poison_client(azure))
    assert [decode(m.content) for m in poisoned] == [
        {"runId": run_id, "blueprintId": "crashy", "nodeId": "a"}]


@pytest.mark.parametrize("keys_per_branch", [1, 12], ids=["patch", "etag"])
async def test_parallel_branches_committing_together_both_survive(
        azure: Any, keys_per_branch: int) -> None:
    """Two branches write different context keys and commit at the same moment (both
    commits are held until both are ready): neither write is lost."""
    barrier = asyncio.Barrier(2)
    committing: list[str] = []

    async def hold(run_id: str, node_id: str) -> None:
        if node_id in ("left", "right"):
            committing.append(node_id)
            await asyncio.wait_for(barrier.wait(), 10)

    def branch(ctx: NodeContext) -> Any:
        return ctx.node_id

    async def writer(ctx: NodeContext) -> Any:
        for k in range(keys_per_branch):
            await ctx.context.set(f"{ctx.node_id}.k{k}", k)
        return branch(ctx)

    flow = (Flow("parallel").node("s", lambda ctx: "s").node("left", writer)
            .node("right", writer).node("j", lambda ctx: sorted(ctx.input))
            .edge("s", "left").edge("s", "right").edge("left", "j").edge("right", "j"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry(), before_commit=hold) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
    assert sorted(committing) == ["left", "right"]
    assert result.status == "completed", result.errors
    for side in ("left", "right"):
        assert result.context[f"_outputs.{side}"] == side
        for k in range(keys_per_branch):
            assert result.context[f"{side}.k{k}"] == k
    assert result.context["_outputs.j"] == ["left", "right"]


async def _restart_redis(azure: Any) -> None:
    await asyncio.to_thread(azure.services.redis.restart)


async def test_redis_restart_mid_run_with_an_any_join(azure: Any) -> None:
    """Redis (no persistence) restarts while both branches of an ``any`` join run; the join
    is decided after the restart. The worker reconnects and the run completes, the join
    running once."""
    runs = Executions()
    release = asyncio.Event()

    async def branch(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await release.wait()
        return ctx.node_id

    flow = (Flow("redis-any").node("s", runs.node()).node("a", branch).node("b", branch)
            .node("j", runs.node(lambda ctx: ctx.input), join_strategy="any")
            .node("k", runs.node())
            .edge("s", "a").edge("s", "b").edge("a", "j").edge("b", "j").edge("j", "k"))
    bp = flow.to_blueprint()
    marker = f"flowcraft:test:{uuid.uuid4().hex}"
    await azure.redis.set(marker, "before the restart")
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        await wait_for(lambda: runs.counts["a"] == 1 and runs.counts["b"] == 1, timeout=15)
        await _restart_redis(azure)
        release.set()
        result = await worker.wait_for_result(run_id, timeout=30)
        await wait_queue_empty(azure.queue)
    assert await azure.redis.get(marker) is None  # it really was a fresh Redis
    assert result.status == "completed", result.errors
    assert runs.counts == {"s": 1, "a": 1, "b": 1, "j": 1, "k": 1}
    assert result.context["_outputs.j"] in ("a", "b")
    store = worker.coordination_store
    assert isinstance(store, RedisCoordinationStore)
    assert store.calls["redis.set_if_not_exist"] >= 1  # the join asked the new Redis


async def test_redis_restart_mid_run_with_a_failing_node(azure: Any) -> None:
    release = asyncio.Event()
    runs = Executions()

    async def boom(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await release.wait()
        raise RuntimeError("exploded after the restart")

    flow = (Flow("redis-fail").node("s", runs.node()).node("boom", boom)
            .node("after", runs.node()).edge("s", "boom").edge("boom", "after"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        await wait_for(lambda: runs.counts["boom"] == 1, timeout=15)
        await _restart_redis(azure)
        release.set()
        result = await worker.wait_for_result(run_id, timeout=30)
        await wait_queue_empty(azure.queue)
    assert result.status == "failed" and result.errors[0].node_id == "boom"
    assert runs.counts == {"s": 1, "boom": 1}
    # The poison marker for its successor was written to the restarted Redis.
    assert await RedisCoordinationStore(azure.redis).get(poison_key(run_id, "after")) == "boom"


# =============================================================================================
# The reconciler
# =============================================================================================


async def test_reconciler_reads_every_page_and_both_timestamp_forms(azure: Any) -> None:
    runs = Executions()
    flow = chain("pages", runs, "a")
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    _, statuses = containers(azure)
    now = time.time()
    fresh = [{"id": f"fresh-{i}", "runId": f"fresh-{i}", "status": "running",
              "lastUpdated": now} for i in range(105)]
    fresh += [{"id": "done-0", "runId": "done-0", "status": "completed", "lastUpdated": 0}]
    await asyncio.gather(*(statuses.create_item(item) for item in fresh))
    stale_iso = await client.start_workflow(bp, {})
    stale_epoch = await client.start_workflow(bp, {})
    await receive_all(azure.queue)
    await statuses.patch_item(stale_iso, partition_key=stale_iso, patch_operations=[
        {"op": "set", "path": "/lastUpdated", "value": "2001-01-01T00:00:00.000Z"}])
    await statuses.patch_item(stale_epoch, partition_key=stale_epoch, patch_operations=[
        {"op": "set", "path": "/lastUpdated", "value": now - 7200}])
    reconciler = create_azure_reconciler(client, azure.cosmos, azure.database,
                                         azure.status_container, stalled_threshold_seconds=60)
    stats = await reconciler.run()
    assert (stats.scanned_items, stats.stalled_runs, stats.reconciled_runs,
            stats.failed_runs) == (107, 2, 2, 0)
    assert sorted(decode(m.content)["runId"] for m in await peek(azure.queue)) == sorted(
        [stale_iso, stale_epoch])


# =============================================================================================
# Throttling (Cosmos 429 / storage 503)
# =============================================================================================


class Throttled(Exception):
    def __init__(self, status: int, retry_after_ms: str | None = None) -> None:
        super().__init__(f"status {status}")
        self.status_code = status
        headers = {"x-ms-retry-after-ms": retry_after_ms} if retry_after_ms else {}
        self.response = type("Response", (), {"headers": headers})()


async def test_throttled_calls_are_retried_with_backoff() -> None:
    calls: list[float] = []

    async def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise Throttled(429 if len(calls) == 1 else 503, retry_after_ms="50")
        return "ok"

    assert await with_throttling_retries(flaky, what="test") == "ok"
    assert len(calls) == 3
    assert calls[1] - calls[0] >= 0.045  # the server's retry-after was honoured


async def test_other_errors_and_exhausted_retries_surface() -> None:
    attempts = 0

    async def broken() -> None:
        nonlocal attempts
        attempts += 1
        raise Throttled(400)

    with pytest.raises(Throttled):
        await with_throttling_retries(broken, what="test")
    assert attempts == 1

    attempts = 0

    async def always_throttled() -> None:
        nonlocal attempts
        attempts += 1
        raise Throttled(429, retry_after_ms="1")

    with pytest.raises(Throttled):
        await with_throttling_retries(always_throttled, what="test", attempts=4)
    assert attempts == 4


async def test_a_throttled_commit_does_not_fail_the_node(azure: Any) -> None:
    """The Cosmos server answers 429 to the first writes of every context: the node still
    completes once (the throttling is retried, not reported as a node failure)."""
    from azure.cosmos.exceptions import CosmosHttpResponseError

    throttled: list[str] = []

    class ThrottlingContainer:
        def __init__(self, inner: Any) -> None:
            self._inner, self._left = inner, 2

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        async def patch_item(self, *args: Any, **kwargs: Any) -> Any:
            if self._left:
                self._left -= 1
                throttled.append("patch")
                raise CosmosHttpResponseError(status_code=429, message="Request rate is large")
            return await self._inner.patch_item(*args, **kwargs)

    class ThrottledAdapter(AzureQueueAdapter):
        def create_backend(self) -> Backend:
            backend = super().create_backend()
            context_of = backend.runs.context

            def throttled_context(run_id: str) -> CosmosDbContext:
                context: CosmosDbContext = context_of(run_id)
                context.container = ThrottlingContainer(context.container)
                return context

            backend.runs.context = throttled_context  # type: ignore[method-assign]
            return backend

    runs = Executions()
    flow = chain("throttled", runs, "a", "b")
    bp = flow.to_blueprint()
    reference = make_adapter(azure, [bp], flow.registry())
    worker = ThrottledAdapter(reference.runtime_options, reference.coordination_store,
                              azure.queue, azure.cosmos, azure.database,
                              azure.context_container, azure.status_container,
                              poll_wait_seconds=1, lease_seconds=5, max_poll_interval=0.2)
    await worker.start()
    try:
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
    finally:
        await worker.stop(timeout_seconds=5)
    assert result.status == "completed", result.errors
    assert runs.counts == {"a": 1, "b": 1} and len(throttled) >= 2


# =============================================================================================
# The key components
# =============================================================================================


