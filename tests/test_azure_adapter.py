"""The Azure adapter (SPEC §6, §8) on real local services: Azurite (Queue Storage), a Cosmos
DB SQL API server and redis-server, started by the ``azure`` fixtures. No SDK is mocked.

Sections: provisioning; ``RedisCoordinationStore``; ``CosmosDbContext``; the worker and the
Python client (encodings, joins, failures, poison messages, leases, stop, sleep, resume,
Redis restarts); the reconciler; throttling; the key components.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
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
    message_count,
    peek,
    poison_client,
    receive_all,
    wait_for,
    wait_queue_empty,
    workers,
)
from distributed_helpers import Executions, comparable, oracle
from flowcraft import ContextTooLargeError, Flow, NodeContext, PatchOperation, WorkflowBlueprint
from flowcraft.adapters.azure import (
    AzureNames,
    AzureQueueAdapter,
    CosmosDbContext,
    RedisCoordinationStore,
    create_azure_reconciler,
    provision_azure,
)
from flowcraft.adapters.azure._cosmos import (
    ITEM_LIMIT_BYTES,
    literal,
    with_throttling_retries,
)
from flowcraft.distributed.backend import Backend
from flowcraft.distributed.coordination import cancel_key, poison_key
from flowcraft.distributed.job import JobPayload
from test_coordination_store import CoordinationStoreContract


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


def test_default_names_are_the_seeds() -> None:
    assert AzureNames() == AzureNames("flowcraft-jobs", "flowcraft-db", "contexts", "statuses")


# =============================================================================================
# RedisCoordinationStore: the shared contract, plus Redis specifics
# =============================================================================================


class TestRedisCoordinationStore(CoordinationStoreContract):
    @pytest.fixture
    async def store(self, azure_services_session: Any) -> Any:
        import redis.asyncio as redis_asyncio

        client = redis_asyncio.from_url(azure_services_session.endpoints.redis_url)
        try:
            yield RedisCoordinationStore(client)
        finally:
            await client.aclose()


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


async def test_context_round_trips_every_json_value_and_odd_keys(azure: Any) -> None:
    context = new_context(azure)
    await context.create({"start": 0})
    for key, value in ODD_KEYS.items():
        await context.set(key, value)
    for key, value in ODD_KEYS.items():
        assert await context.get(key) == value, key
        assert await context.has(key)
    assert await context.to_dict() == {"start": 0, **ODD_KEYS}
    assert await context.get("absent") is None and not await context.has("absent")
    assert await context.delete("camelCase") is True
    assert await context.delete("camelCase") is False
    assert not await context.has("camelCase")
    # The item is {id, runId, <key>: <value>...}: one item per run, in its own partition,
    # the keys at the top level as the TypeScript library writes them.
    raw = await items_with_id(containers(azure)[0], context.run_id)
    assert len(raw) == 1 and raw[0]["runId"] == context.run_id
    expected = {"start": 0, **ODD_KEYS}
    del expected["camelCase"]
    assert {k: v for k, v in raw[0].items() if k not in SYSTEM} == {
        "id": context.run_id, "runId": context.run_id, **expected}


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


async def test_context_over_two_megabytes_fails_naming_the_run_and_size(azure: Any) -> None:
    context = new_context(azure)
    await context.create({"small": "s"})
    blob = "x" * (ITEM_LIMIT_BYTES + 10)
    with pytest.raises(ContextTooLargeError) as raised:
        await context.set("blob", blob)
    error = raised.value
    assert context.run_id in str(error) and str(error.size_bytes) in str(error)
    assert error.size_bytes > ITEM_LIMIT_BYTES and error.limit_bytes == ITEM_LIMIT_BYTES
    assert "Cosmos DB" in str(error)
    assert await context.to_dict() == {"small": "s"}  # nothing written, nothing truncated

    # Growth across writes: each write fits, the item would not.
    half = "y" * (ITEM_LIMIT_BYTES // 2 + 1000)
    await context.set("first", half)
    with pytest.raises(ContextTooLargeError, match=context.run_id):
        await context_of(azure, context.run_id).set("second", half)
    assert not await context.has("second")

    # Too large from the start.
    fresh = new_context(azure)
    with pytest.raises(ContextTooLargeError, match=fresh.run_id):
        await fresh.create({"blob": blob})
    assert await fresh.load() is None

    # Just under the limit: stored whole.
    almost = new_context(azure)
    await almost.create({"blob": "z" * (ITEM_LIMIT_BYTES - 1000)})
    assert len(await almost.get("blob")) == ITEM_LIMIT_BYTES - 1000


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
# The worker and the Python client
# =============================================================================================


async def test_client_starts_a_run_and_the_worker_completes_it(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("greet")
            .node("fetchUser", runs.node(lambda ctx: {"name": ctx.input or "ada"}))
            .node("sendMail", runs.node(lambda ctx: f"hello {ctx.input['name']}"))
            .edge("fetchUser", "sendMail"))
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {"tenant": "t1"})
    status = await client.get_run_status(run_id)
    assert status["status"] == "running" and status["blueprintId"] == "greet"
    assert isinstance(status["lastUpdated"], str)
    with pytest.raises(TimeoutError, match=run_id):
        await client.wait_for_result(run_id, timeout=0.3)
    # An upper-case worker id: lease owners appear in the conditions of claims and commits.
    async with workers(azure, [bp], flow.registry(), worker_id="EU-West-Worker") as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
    assert result.status == "completed", result.errors
    assert result.run_id == run_id
    assert result.context["tenant"] == "t1"
    assert result.context["_outputs.sendMail"] == "hello ada"
    assert runs.counts == {"fetchUser": 1, "sendMail": 1}
    status = await client.get_run_status(run_id)
    assert status["status"] == "completed" and status["finalStatus"] == "completed"
    assert await client.get_run_status("no-such-run") is None


async def test_handle_job_processes_one_job_for_serverless_handlers(azure: Any) -> None:
    runs = Executions()
    flow = chain("single", runs, "only")
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    [message] = await receive_all(azure.queue)
    assert await client.handle_job(message.content) == "processed"
    assert await client.handle_job(message.content) == "duplicate"
    assert (await client.wait_for_result(run_id, timeout=5)).status == "completed"
    assert runs.counts == {"only": 1}


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
    # The same job as plain JSON text (what the seed's client sends) runs the same.
    await azure.queue.send_message(json.dumps({"runId": run_id, "blueprintId": "encodings",
                                               "nodeId": "a"}))
    async with workers(azure, [bp], flow.registry()) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"a": 1, "b": 1}
    assert [decode(m.body)["nodeId"] for m in worker.received] == ["a"]


async def test_fan_in_all_matches_the_in_memory_run(azure: Any) -> None:
    runs = Executions()
    flow = Flow("fan-all").node("s", runs.node(lambda ctx: 1))
    for branch in ("b0", "b1", "b2"):
        flow.node(branch, runs.node(lambda ctx: [ctx.node_id, ctx.input]))
        flow.edge("s", branch).edge(branch, "j")
    flow.node("j", runs.node(lambda ctx: sorted(ctx.input)))
    bp = flow.to_blueprint()
    expected = await oracle(bp, flow.registry(), {"in": 1}, run_id="fan-all-run")
    runs.reset()
    async with workers(azure, [bp], flow.registry(), count=2) as (worker, _):
        run_id = await worker.start_workflow(bp, {"in": 1}, run_id="fan-all-run")
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.j"] == ["b0", "b1", "b2"]
    assert runs.counts == {"s": 1, "b0": 1, "b1": 1, "b2": 1, "j": 1}


async def test_fan_in_any_runs_once_on_the_first_arrival(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("fan-any")
            .node("s", runs.node(lambda ctx: "go"))
            .node("fast", runs.node(lambda ctx: "fast"))
            .node("slow", runs.node(lambda ctx: "slow", delay=1.5))
            .node("j", runs.node(lambda ctx: {"got": ctx.input}), join_strategy="any")
            .node("k", runs.node())
            .edge("s", "fast").edge("s", "slow").edge("fast", "j").edge("slow", "j")
            .edge("j", "k"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry(), count=2) as (worker, _):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.j"] == {"got": "fast"}
    assert result.context["_outputs.slow"] == "slow"  # the run ended after the late branch
    assert runs.counts == {"s": 1, "fast": 1, "slow": 1, "j": 1, "k": 1}


async def test_conditional_diamond_converges_and_skips_propagate(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("diamond")
            .node("s", runs.node(lambda ctx: {"go": "right"}))
            .node("left", runs.node()).node("left2", runs.node()).node("right", runs.node())
            .node("join", runs.node(lambda ctx: sorted(ctx.input))).node("end", runs.node())
            .edge("s", "left", condition="result.output.go == 'left'")
            .edge("s", "right", condition="result.output.go == 'right'")
            .edge("left", "left2").edge("left2", "join").edge("right", "join")
            .edge("join", "end"))
    bp = flow.to_blueprint()
    expected = await oracle(bp, flow.registry(), run_id="diamond-run")
    runs.reset()
    async with workers(azure, [bp], flow.registry(), count=2) as (worker, _):
        run_id = await worker.start_workflow(bp, {}, run_id="diamond-run")
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    assert result.context["_outputs.join"] == ["right"]
    assert runs.counts == {"s": 1, "right": 1, "join": 1, "end": 1}
    data = await context_of(azure, run_id).load()
    assert data["_flowcraft.node.left"]["skipped"] is True
    assert data["_flowcraft.node.left2"]["skipped"] is True


async def test_failing_node_fails_the_run_naming_the_node(azure: Any) -> None:
    runs = Executions()

    async def boom(ctx: NodeContext) -> Any:
        runs.record(ctx)
        raise RuntimeError("card declined")

    flow = (Flow("failing").node("s", runs.node()).node("chargeCard", boom, max_retries=2)
            .node("ok", runs.node(delay=0.3))
            .node("d_all", runs.node()).node("e_any", runs.node(), join_strategy="any")
            .edge("s", "chargeCard").edge("s", "ok").edge("chargeCard", "d_all")
            .edge("ok", "d_all").edge("chargeCard", "e_any").edge("ok", "e_any"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
    assert result.status == "failed"
    assert [error.node_id for error in result.errors] == ["chargeCard"]
    assert "card declined" in result.errors[0].message and result.errors[0].attempt == 2
    assert runs.counts["chargeCard"] == 2  # maxRetries is the number of attempts
    assert runs.counts["d_all"] == 0 and runs.counts["e_any"] == 0
    status = await worker.get_run_status(run_id)
    assert status["status"] == "failed" and status["failedNodeId"] == "chargeCard"
    assert "node 'chargeCard' failed" in status["error"]
    store = RedisCoordinationStore(azure.redis)
    assert await store.get(poison_key(run_id, "d_all")) == "chargeCard"
    assert await store.get(cancel_key(run_id, "e_any")) == "chargeCard"


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


async def test_malformed_messages_move_to_the_poison_queue(
        azure: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="flowcraft")
    runs = Executions()
    flow = chain("victim", runs, "a")
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    await receive_all(azure.queue)  # the run's own job is not needed here
    missing_node = json.dumps({"runId": run_id, "blueprintId": "victim"})
    bodies = ["this is not a job!", "{broken",
              base64.b64encode(b"\xff\xfe not utf-8").decode(), missing_node]
    for body in bodies:
        await azure.queue.send_message(body)
    async with workers(azure, [bp], flow.registry()) as (worker,):
        await wait_queue_empty(azure.queue)
        result = await worker.wait_for_result(run_id, timeout=10)
    assert runs.counts == {}
    poisoned = sorted(m.content for m in await receive_all(poison_client(azure)))
    assert poisoned == sorted(bodies)
    # The message that named a run failed it, with the reason.
    assert result.status == "failed"
    assert "invalid job message" in (await worker.get_run_status(run_id))["error"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for message in worker.received:
        assert message.message_id in logged


async def test_unknown_blueprint_fails_the_run_and_moves_the_message(azure: Any) -> None:
    runs = Executions()
    known, other = chain("known", runs, "x"), chain("elsewhere", runs, "x")
    client = make_adapter(azure, [other.to_blueprint()], other.registry())
    run_id = await client.start_workflow(other.to_blueprint(), {})
    async with workers(azure, [known.to_blueprint()], known.registry(),
                       unknown_blueprint_grace_seconds=0) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
    assert result.status == "failed" and runs.counts == {}
    assert "unknown blueprint id 'elsewhere'" in (await client.get_run_status(run_id))["error"]
    [poisoned] = await receive_all(poison_client(azure))
    assert decode(poisoned.content)["blueprintId"] == "elsewhere"


async def test_resume_with_action_on_a_wait_node(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("approval")
            .node("request", runs.node(lambda ctx: {"amount": 120}))
            .wait("approve")
            .node("pay", runs.node(lambda ctx: {"paid": ctx.input}))
            .node("reject", runs.node(lambda ctx: "rejected"))
            .edge("request", "approve")
            .edge("approve", "pay", action="approved")
            .edge("approve", "reject", action="denied"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        parked = await worker.wait_for_result(run_id, timeout=20)
        assert parked.status == "awaiting"
        assert parked.context["_awaitingNodeIds"] == ["approve"]
        assert (await worker.get_run_status(run_id))["status"] == "awaiting"
        assert runs.counts == {"request": 1}
        enqueued = await worker.resume_with_action(run_id, "approved", {"by": "ada"})
        assert enqueued == ["approve"]
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.approve"] == {"by": "ada"}
    assert result.context["_outputs.pay"] == {"paid": {"by": "ada"}}
    assert "_awaitingNodeIds" not in result.context
    assert runs.counts == {"request": 1, "pay": 1}


async def test_node_outliving_the_visibility_timeout_runs_once(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("long").node("longJob", runs.node(lambda ctx: "done", delay=6.0))
            .node("after", runs.node()).edge("longJob", "after"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry(), count=2, lease_seconds=2) as (w1, w2):
        run_id = await w1.start_workflow(bp, {})
        result = await w1.wait_for_result(run_id, timeout=30)
        await wait_queue_empty(azure.queue)
    assert result.status == "completed", result.errors
    assert runs.counts == {"longJob": 1, "after": 1}
    # Its message stayed invisible the whole time: received once, by one worker.
    deliveries = w1.received_jobs("longJob") + w2.received_jobs("longJob")
    assert [m.receive_count for m in deliveries] == [1]


async def test_duplicate_delivery_runs_each_node_once(azure: Any) -> None:
    runs = Executions()
    # camelCase ids: the local Cosmos server lower-cases conditions (see literal()).
    flow = chain("dupes", runs, "chargeCard", "shipOrder", "notifyUser")
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    [message] = await peek(azure.queue)
    # The same job, delivered three times.
    await azure.queue.send_message(message.content)
    await azure.queue.send_message(message.content)
    assert await message_count(azure.queue) == 3
    async with workers(azure, [bp], flow.registry(), count=2,
                       lease_seconds=2) as (worker, _):
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
        assert result.status == "completed"
        # A late copy of a finished middle job changes nothing.
        assert await worker.handle_job(JobPayload(run_id, "dupes", "shipOrder")) == "duplicate"
        await asyncio.sleep(0.5)
        await wait_queue_empty(azure.queue)
    assert runs.counts == {"chargeCard": 1, "shipOrder": 1, "notifyUser": 1}
    assert (await client.wait_for_result(run_id, timeout=1)).context == result.context


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


@pytest.mark.parametrize("graceful", [True, False], ids=["finish", "cancel"])
async def test_stop_mid_run_loses_nothing(azure: Any, graceful: bool) -> None:
    """``stop()`` while a slow node runs: gracefully the node finishes; with a short timeout
    it is cancelled, its lease released and its message visible again at once, so a second
    worker runs it to completion and its effect lands once."""
    runs = Executions()
    started = asyncio.Event()

    async def slow(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started.set()
        await asyncio.sleep(2.0)
        return "slow-done"

    flow = (Flow("stoppable").node("a", runs.node()).node("slow", slow)
            .node("z", runs.node()).edge("a", "slow").edge("slow", "z"))
    bp = flow.to_blueprint()
    first = make_adapter(azure, [bp], flow.registry(), lease_seconds=5)
    await first.start()
    run_id = await first.start_workflow(bp, {})
    await asyncio.wait_for(started.wait(), 10)
    stopping = time.monotonic()
    await first.stop(timeout_seconds=10 if graceful else 0.2)
    if graceful:
        assert runs.counts == {"a": 1, "slow": 1, "z": 1}
    async with workers(azure, [bp], flow.registry()) as (second,):
        result = await second.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(azure.queue)
    assert result.status == "completed", result.errors
    assert runs.counts["a"] == 1 and runs.counts["z"] == 1
    assert runs.counts["slow"] == (1 if graceful else 2)
    assert result.context["_outputs.slow"] == "slow-done"
    if not graceful:
        # Released, not left to time out: picked up well before the 5 s lease would end.
        [redelivered] = second.received_jobs("a")
        assert redelivered.receive_count == 2
        assert time.monotonic() - stopping < 4.5


async def test_durable_sleep_sends_the_successor_with_a_visibility_timeout(azure: Any) -> None:
    runs = Executions()
    stamps: dict[str, float] = {}

    def stamp(name: str) -> Any:
        def compute(ctx: NodeContext) -> Any:
            stamps[name] = time.monotonic()
            return name
        return compute

    sleepy = (Flow("sleepy").node("before", runs.node(stamp("before"))).sleep("nap", "3s")
              .node("after", runs.node(stamp("after"))).edge("before", "nap")
              .edge("nap", "after"))
    quick = chain("quick", runs, "q1", "q2")
    bps = [sleepy.to_blueprint(), quick.to_blueprint()]
    registry = {**sleepy.registry(), **quick.registry()}
    async with workers(azure, bps, registry, concurrency=1) as (worker,):
        sleeping = await worker.start_workflow(bps[0], {})

        async def napped() -> bool:
            return await context_of(azure, sleeping).has("_outputs.nap")

        await wait_for(napped, timeout=10)
        await asyncio.sleep(0.5)  # the job that ran "before" and "nap" is acknowledged
        # One message in the queue, and it is not visible: "after" waits out its delay.
        assert await message_count(azure.queue) == 1 and not await peek(azure.queue)
        record = await context_of(azure, sleeping).get("_flowcraft.node.nap")
        assert record["wakeUpAt"] - time.time() > 1.5
        # The worker (concurrency 1) is not held by the sleep: another run goes through.
        other = await worker.start_workflow(bps[1], {})
        assert (await worker.wait_for_result(other, timeout=2.5)).status == "completed"
        assert runs.counts["after"] == 0
        result = await worker.wait_for_result(sleeping, timeout=20)
    assert result.status == "completed", result.errors
    waited = stamps["after"] - stamps["before"]
    assert 2.5 <= waited < 8, waited
    assert runs.counts == {"before": 1, "after": 1, "q1": 1, "q2": 1}


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


async def test_node_output_over_two_megabytes_fails_the_run_clearly(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("big-output")
            .node("small", runs.node(lambda ctx: "fine"))
            .node("huge", runs.node(lambda ctx: "h" * (ITEM_LIMIT_BYTES + 1000)))
            .node("after", runs.node())
            .edge("small", "huge").edge("huge", "after"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry(), lease_seconds=2,
                       max_receive_count=3) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=25)
    assert result.status == "failed"
    assert runs.counts["after"] == 0
    assert runs.counts["huge"] == 1  # failed once, clearly: not retried until poisoned
    assert result.errors and result.errors[0].node_id == "huge"
    message = result.errors[0].message
    assert run_id in message and "bytes" in message and "Cosmos DB" in message
    assert "_outputs.huge" not in result.context
    assert result.context["_outputs.small"] == "fine"


# =============================================================================================
# The reconciler
# =============================================================================================


async def test_reconciler_resumes_a_run_whose_messages_were_lost(azure: Any) -> None:
    runs = Executions()
    flow = chain("lost", runs, "a", "b")
    bp = flow.to_blueprint()
    client = make_adapter(azure, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {"order": 7})
    assert len(await receive_all(azure.queue)) == 1  # the start message is lost
    patient = create_azure_reconciler(client, azure.cosmos, azure.database,
                                      azure.status_container, stalled_threshold_seconds=3600)
    stats = await patient.run()
    # The query returns only runs not updated within the threshold: none yet.
    assert stats.scanned_items == 0 and stats.stalled_runs == 0
    reconciler = create_azure_reconciler(client, azure.cosmos, azure.database,
                                         azure.status_container, stalled_threshold_seconds=0)
    stats = await reconciler.run()
    assert (stats.scanned_items, stats.stalled_runs, stats.reconciled_runs,
            stats.failed_runs) == (1, 1, 1, 0)
    assert [decode(m.content)["nodeId"] for m in await peek(azure.queue)] == ["a"]
    async with workers(azure, [bp], flow.registry()) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"a": 1, "b": 1}
    stats = await reconciler.run()  # a completed run is not running: left alone
    assert stats.stalled_runs == 0


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


async def test_reconcile_does_not_enqueue_a_node_that_is_running(azure: Any) -> None:
    runs = Executions()
    release = asyncio.Event()

    async def held(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await release.wait()
        return "ok"

    flow = Flow("held").node("held", held)
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        await wait_for(lambda: runs.counts["held"] == 1, timeout=10)
        assert await worker.reconcile(run_id) == []
        release.set()
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"held": 1}


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


async def test_key_components_are_exported_and_fit_the_protocols(azure: Any) -> None:
    import flowcraft.adapters.azure as azure_adapter
    from flowcraft import AsyncContext
    from flowcraft.distributed import BaseDistributedAdapter, CoordinationStore, Reconciler

    assert {"AzureQueueAdapter", "CosmosDbContext", "RedisCoordinationStore",
            "create_azure_reconciler"} <= set(azure_adapter.__all__)
    bp = WorkflowBlueprint.model_validate({"id": "k", "nodes": [{"id": "a", "uses": "a"}],
                                           "edges": []})
    adapter = make_adapter(azure, [bp], {"a": lambda ctx: 1})
    assert isinstance(adapter, BaseDistributedAdapter)
    assert isinstance(adapter.create_context("r"), AsyncContext)
    assert isinstance(RedisCoordinationStore(azure.redis), CoordinationStore)
    reconciler = create_azure_reconciler(adapter, azure.cosmos, azure.database,
                                         azure.status_container, 300)
    assert isinstance(reconciler, Reconciler)
