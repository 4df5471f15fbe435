"""The AWS adapter against a real moto server on loopback (no SDK mocks): provisioning,
``DynamoDbCoordinationStore`` on the seed's table schema, ``DynamoDbContext``, the
``SqsAdapter`` worker and client, ``create_sqs_reconciler``, and the faults a queue
delivers (duplicates, slow nodes, poison and malformed messages, stopping workers)."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from aws_helpers import (
    RecordingSqsAdapter,
    make_adapter,
    make_moto_dynamodb_atomic,
    peek,
    queue_counts,
    raw_item,
    receive_all,
    wait_for,
    wait_queue_empty,
    workers,
)
from distributed_helpers import Executions, comparable, oracle
from flowcraft import (
    ContextTooLargeError,
    Flow,
    FlowcraftError,
    NodeContext,
    NodeResult,
    PatchOperation,
)
from flowcraft.adapters.aws import (
    AwsNames,
    DynamoDbContext,
    DynamoDbCoordinationStore,
    create_sqs_reconciler,
    provision_aws,
)
from flowcraft.distributed.job import JobPayload
from test_coordination_store import CoordinationStoreContract

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)  # see aws_helpers: moto loses concurrent updates


def no_decimals(value: Any) -> bool:
    if isinstance(value, Decimal):
        return False
    if isinstance(value, dict):
        return all(no_decimals(v) for v in value.values())
    if isinstance(value, list):
        return all(no_decimals(v) for v in value)
    return True


def chain(flow_id: str, runs: Executions, *node_ids: str, delay: float = 0.0) -> Flow:
    flow = Flow(flow_id)
    for node_id in node_ids:
        flow.node(node_id, runs.node(delay=delay))
    for source, target in itertools.pairwise(node_ids):
        flow.edge(source, target)
    return flow


# =============================================================================================
# Provisioning
# =============================================================================================


async def test_provision_creates_exactly_the_seed_resources_and_is_idempotent(moto: Any) -> None:
    from aiobotocore.session import get_session

    # A region of its own: the session's moto server holds other tests' resources, and
    # queues and tables are per region, so "exactly these" can be checked.
    options = {"region_name": "eu-north-1", "endpoint_url": moto.url,
               "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    session = get_session()
    async with session.create_client("sqs", **options) as sqs, session.create_client(
        "dynamodb", **options
    ) as dynamodb:
        first = await provision_aws(sqs, dynamodb)  # the seed's default names
        assert sorted(first["created"]) == sorted([
            "queue flowcraft-jobs", "table flowcraft-contexts", "table flowcraft-statuses",
            "table flowcraft-coordination", "ttl flowcraft-coordination.ttl",
            "index flowcraft-statuses.status-lastUpdated", "ttl flowcraft-statuses.ttl",
            "ttl flowcraft-contexts._flowcraft.ttl",
        ])
        assert first["queueUrl"].endswith("/flowcraft-jobs")

        queues = (await sqs.list_queues()).get("QueueUrls", [])
        assert queues == [first["queueUrl"]]
        assert sorted((await dynamodb.list_tables())["TableNames"]) == [
            "flowcraft-contexts", "flowcraft-coordination", "flowcraft-statuses"]
        for table, key in (("flowcraft-contexts", "runId"), ("flowcraft-statuses", "runId"),
                           ("flowcraft-coordination", "key")):
            description = (await dynamodb.describe_table(TableName=table))["Table"]
            assert description["KeySchema"] == [{"AttributeName": key, "KeyType": "HASH"}]
            assert {"AttributeName": key, "AttributeType": "S"} in description[
                "AttributeDefinitions"]
            assert description["BillingModeSummary"]["BillingMode"] == "PAY_PER_REQUEST"
        ttl = (await dynamodb.describe_time_to_live(TableName="flowcraft-coordination"))
        assert ttl["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED",
                                                "AttributeName": "ttl"}
        # Finished runs expire: TTL on the statuses' ttl and the contexts' _flowcraft.ttl.
        for table, attribute in (("flowcraft-contexts", "_flowcraft.ttl"),
                                 ("flowcraft-statuses", "ttl")):
            status = (await dynamodb.describe_time_to_live(TableName=table))
            assert status["TimeToLiveDescription"] == {"TimeToLiveStatus": "ENABLED",
                                                       "AttributeName": attribute}
        # Runs are listed through an index on status + lastUpdated, never a scan.
        indexes = (await dynamodb.describe_table(TableName="flowcraft-statuses"))["Table"][
            "GlobalSecondaryIndexes"]
        assert [(i["IndexName"], i["KeySchema"]) for i in indexes] == [
            ("status-lastUpdated", [{"AttributeName": "status", "KeyType": "HASH"},
                                    {"AttributeName": "lastUpdated", "KeyType": "RANGE"}])]

        again = await provision_aws(sqs, dynamodb, AwsNames())
        assert again == {"queueUrl": first["queueUrl"], "created": []}
        assert (await sqs.list_queues())["QueueUrls"] == queues
        assert len((await dynamodb.list_tables())["TableNames"]) == 3

        # A coordination table made for the reference's code (key 'coordinationKey') is not
        # the seed's schema: provisioning says so instead of using it.
        await dynamodb.delete_table(TableName="flowcraft-coordination")
        await dynamodb.create_table(
            TableName="flowcraft-coordination",
            AttributeDefinitions=[{"AttributeName": "coordinationKey", "AttributeType": "S"}],
            KeySchema=[{"AttributeName": "coordinationKey", "KeyType": "HASH"}],
            BillingMode="PAY_PER_REQUEST")
        # (A FlowcraftError, so the CLI prints it as one line.)
        with pytest.raises(FlowcraftError, match=r"flowcraft-coordination.*coordinationKey"):
            await provision_aws(sqs, dynamodb)


# =============================================================================================
# DynamoDbCoordinationStore: the coordination contract, on the seed's schema
# =============================================================================================


_SESSION: Any = None
CONTRACT_TABLE = "contract-coordination"


@pytest.fixture
async def coordination_table(moto: Any) -> AsyncIterator[tuple[Any, str]]:
    """A DynamoDB client and a coordination table of the seed's schema, shared by these
    tests (every test uses fresh keys): cheaper than a full ``aws`` fixture per test."""
    global _SESSION
    from aiobotocore.session import get_session

    _SESSION = _SESSION or get_session()  # one session: service models load once
    async with _SESSION.create_client(
        "dynamodb", region_name="us-east-1", endpoint_url=moto.url,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ) as client:
        try:
            await client.describe_table(TableName=CONTRACT_TABLE)
        except client.exceptions.ResourceNotFoundException:
            await client.create_table(
                TableName=CONTRACT_TABLE,
                AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST")
            await client.update_time_to_live(
                TableName=CONTRACT_TABLE,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"})
        yield client, CONTRACT_TABLE


class TestDynamoDbCoordinationStore(CoordinationStoreContract):
    """The shared coordination contract (tests/test_coordination_store.py) on DynamoDB."""

    @pytest.fixture
    async def store(self, coordination_table: tuple[Any, str]
                    ) -> AsyncIterator[DynamoDbCoordinationStore]:
        client, table = coordination_table
        yield DynamoDbCoordinationStore(client=client, table_name=table)


def key() -> str:
    return f"flowcraft:test:{uuid.uuid4().hex[:8]}"


async def _coordination_item(client: Any, table: str, k: str) -> dict[str, Any] | None:
    response = await client.get_item(TableName=table, Key={"key": {"S": k}},
                                     ConsistentRead=True)
    return response.get("Item")


async def test_dynamodb_coordination_items_use_the_seed_schema(
        coordination_table: tuple[Any, str]) -> None:
    client, table = coordination_table
    store = DynamoDbCoordinationStore(client=client, table_name=table)
    k = key()
    before = int(time.time())
    await store.set_if_not_exist(k, "v", 100)
    item = await _coordination_item(client, table, k)
    assert item is not None and item["key"] == {"S": k}
    assert before + 100 <= int(item["ttl"]["N"]) <= int(time.time()) + 100
    await store.increment(k2 := key(), 0)
    item = await _coordination_item(client, table, k2)
    assert item is not None and int(item["ttl"]["N"]) == 0  # 0: no expiry
    await store.set_if_not_exist(forever := key(), "forever", 0)
    assert await store.extend_ttl(forever, 0) is True
    assert await store.get(forever) == "forever"


async def test_dynamodb_coordination_expired_items_read_as_absent(
        coordination_table: tuple[Any, str]) -> None:
    """DynamoDB deletes expired items lazily, up to days later (moto never does): an item
    whose ``ttl`` has passed must behave as absent for every operation."""
    client, table = coordination_table
    store = DynamoDbCoordinationStore(client=client, table_name=table)

    async def expire(k: str) -> None:
        await client.update_item(
            TableName=table, Key={"key": {"S": k}},
            UpdateExpression="SET #t = :t", ExpressionAttributeNames={"#t": "ttl"},
            ExpressionAttributeValues={":t": {"N": str(int(time.time()) - 10)}})
        assert await _coordination_item(client, table, k) is not None  # still stored

    lock, counter, join = key(), key(), key()
    await store.set_if_not_exist(lock, "old-owner", 60)
    await store.increment(counter, 60)
    await store.increment(counter, 60)
    await store.join_add(join, "a", 60)
    await store.join_add(join, "b", 60)
    for k in (lock, counter, join):
        await expire(k)

    assert await store.get(lock) is None
    assert await store.extend_ttl(lock, 60) is False
    assert await store.set_if_not_exist(lock, "new-owner", 60) is True
    assert await store.get(lock) == "new-owner"

    assert await store.get(counter) is None
    assert await store.increment(counter, 60) == 1
    assert await store.increment(counter, 60) == 2

    assert await store.join_members(join) == set()
    assert await store.join_add(join, "c", 60) == 1  # stale members do not count
    assert await store.join_members(join) == {"c"}

    # Workers racing to restart an expired counter or join still count each one once.
    for k in (counter, join):
        await expire(k)
    counts = await asyncio.gather(*(store.increment(counter, 60) for _ in range(10)))
    assert sorted(counts) == list(range(1, 11))
    sizes = await asyncio.gather(*(store.join_add(join, m, 60) for m in "defgh"))
    assert max(sizes) == 5 and await store.join_members(join) == set("defgh")


# =============================================================================================
# DynamoDbContext
# =============================================================================================

NUMBERS = {
    "int": 1, "negative": -7, "zero": 0, "big": 2**62, "float": 2.5, "small": 1e-7,
    "neg_float": -0.125, "float_whole": 3.0,
    "nested": {"a": [1, 2.25, {"b": 0, "c": [10, -1.5]}], "d": {"e": 99}},
    "flag": True, "nothing": None, "text": "x",
}


async def test_context_numbers_round_trip_without_decimal(aws: Any) -> None:
    run_id = str(uuid.uuid4())
    context = DynamoDbContext(run_id, client=aws.dynamodb, table_name=aws.context_table)
    await context.create(NUMBERS)
    loaded = await context.load()
    assert loaded == NUMBERS
    assert no_decimals(loaded)
    for name in ("int", "negative", "zero", "big"):
        assert type(loaded[name]) is int, name
    for name in ("float", "small", "neg_float"):
        assert type(loaded[name]) is float, name
    # (A whole float such as 3.0 stays a float on moto, which returns numbers as they were
    # sent; real DynamoDB normalises "3.0" to "3", so there it reads back as the int 3.)
    assert loaded["float_whole"] == 3
    assert type(loaded["nested"]["a"][0]) is int
    assert type(loaded["nested"]["a"][1]) is float
    assert type(loaded["nested"]["a"][2]["c"][1]) is float
    assert type(loaded["nested"]["d"]["e"]) is int


async def test_context_async_context_api(aws: Any) -> None:
    context = DynamoDbContext(str(uuid.uuid4()), client=aws.dynamodb,
                              table_name=aws.context_table)
    await context.create({"a": 1})
    await context.set("b", {"c": [1, 2]})
    assert await context.get("b") == {"c": [1, 2]}
    assert await context.get("missing", "default") == "default"
    assert await context.has("a") and not await context.has("missing")
    assert await context.delete("a") is True
    assert await context.delete("a") is False
    await context.patch([PatchOperation("set", "x", 1.5), PatchOperation("delete", "b")])
    assert await context.to_dict() == {"x": 1.5}


async def test_context_flattens_the_seed_clients_nested_context(aws: Any) -> None:
    """The seed's JavaScript client writes ``{runId, context: initialContext}``."""
    run_id = str(uuid.uuid4())
    await aws.dynamodb.put_item(TableName=aws.context_table, Item={
        "runId": {"S": run_id},
        "context": {"M": {"orderId": {"N": "7"}, "price": {"N": "9.5"},
                          "customer": {"M": {"name": {"S": "Ada"}, "tags": {"L": [
                              {"S": "vip"}]}}}}},
    })
    context = DynamoDbContext(run_id, client=aws.dynamodb, table_name=aws.context_table)
    assert await context.load() == {"orderId": 7, "price": 9.5,
                                    "customer": {"name": "Ada", "tags": ["vip"]}}
    assert await context.get("orderId") == 7
    await context.set("orderId", 8)
    assert await context.get("orderId") == 8
    assert await context.delete("price") is True
    data = await context.to_dict()
    assert "price" not in data and "context" not in data
    assert data == {"orderId": 8, "customer": {"name": "Ada", "tags": ["vip"]}}


async def test_context_keeps_a_user_key_named_context(aws: Any) -> None:
    """Only the seed client's item shape is flattened; a run started from Python whose
    initial context has a key ``context`` keeps it."""
    runs = Executions()
    flow = Flow("ctxkey").node("a", runs.node(lambda ctx: "ok"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {"context": {"user": "Ada"}, "n": 1})
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed"
    assert result.context["context"] == {"user": "Ada"}
    assert "user" not in result.context


async def test_context_over_400kb_at_create_is_refused_whole(aws: Any) -> None:
    run_id = str(uuid.uuid4())
    context = DynamoDbContext(run_id, client=aws.dynamodb, table_name=aws.context_table)
    with pytest.raises(ContextTooLargeError) as info:
        await context.create({"blob": "x" * 450_000})
    message = str(info.value)
    assert run_id in message and str(info.value.size_bytes) in message
    assert info.value.size_bytes >= 450_000 and info.value.limit_bytes == 400 * 1024
    assert await raw_item(aws, aws.context_table, {"runId": run_id}) is None

    # Through the client: nothing stored, nothing enqueued.
    flow = Flow("big-start").node("a", lambda ctx: 1)
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    with pytest.raises(ContextTooLargeError, match=r"\d+ bytes"):
        await client.start_workflow(bp, {"blob": "y" * 450_000}, run_id="too-big-run")
    assert await raw_item(aws, aws.context_table, {"runId": "too-big-run"}) is None
    assert await client.get_run_status("too-big-run") is None
    assert await queue_counts(aws.sqs, aws.queue_url) == {"visible": 0, "in_flight": 0,
                                                          "delayed": 0}

    # Just under the limit: stored in full, not truncated.
    almost = DynamoDbContext(str(uuid.uuid4()), client=aws.dynamodb,
                             table_name=aws.context_table)
    blob = "z" * 380_000
    await almost.create({"blob": blob})
    assert await almost.get("blob") == blob


async def test_node_output_over_400kb_fails_the_run_with_a_clear_error(aws: Any) -> None:
    runs = Executions()
    flow = (Flow("big-output")
            .node("small", runs.node(lambda ctx: "fine"))
            .node("huge", runs.node(lambda ctx: "h" * 450_000))
            .node("after", runs.node())
            .edge("small", "huge").edge("huge", "after"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), lease_seconds=2,
                       max_receive_count=3) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=25)
    assert result.status == "failed"
    assert runs.counts["after"] == 0
    assert runs.counts["huge"] == 1  # failed once, clearly: not retried until poisoned
    assert result.errors and result.errors[0].node_id == "huge"
    message = result.errors[0].message
    assert run_id in message and "bytes" in message and "DynamoDB" in message
    status = await worker.get_run_status(run_id)
    assert status["status"] == "failed" and run_id in status["error"]
    # Nothing was truncated into the context: the output is simply absent.
    assert "_outputs.huge" not in result.context
    assert result.context["_outputs.small"] == "fine"


# =============================================================================================
# SqsAdapter: the worker and the client
# =============================================================================================


async def test_worker_runs_a_workflow_and_the_client_sees_it(aws: Any) -> None:
    runs = Executions()

    async def total(ctx: NodeContext) -> Any:
        runs.record(ctx)
        order = await ctx.context.get("order")
        await ctx.context.set("seen", {"qty": order["qty"], "price": order["price"]})
        return order["qty"] * order["price"]

    async def check(ctx: NodeContext) -> Any:
        runs.record(ctx)
        seen = await ctx.context.get("seen")
        assert no_decimals(seen) and type(seen["qty"]) is int and type(seen["price"]) is float
        assert type(ctx.input) is float
        return {"total": ctx.input, "ok": True}

    flow = Flow("orders", version="3").node("total", total).node("check", check).edge(
        "total", "check")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {"order": {"qty": 3, "price": 2.5}})
    status = await client.get_run_status(run_id)
    assert status["status"] == "running" and status["runId"] == run_id
    assert status["blueprintId"] == "orders" and isinstance(status["lastUpdated"], str)
    assert await client.get_run_status("no-such-run") is None
    with pytest.raises(TimeoutError, match=run_id):
        await client.wait_for_result(run_id, timeout=0.3)  # no worker yet

    async with workers(aws, [bp], flow.registry(), count=2):
        result = await client.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert result.run_id == run_id
    assert result.context["_outputs.check"] == {"total": 7.5, "ok": True}
    assert result.context["blueprintVersion"] == "3"
    assert dict(runs.counts) == {"total": 1, "check": 1}
    final = await client.get_run_status(run_id)
    assert final["status"] == "completed" and final["finalStatus"] == "completed"
    await wait_queue_empty(aws.sqs, aws.queue_url)


async def test_handle_job_processes_one_job_for_serverless_handlers(aws: Any) -> None:
    """``handle_job`` without polling, as an AWS Lambda SQS trigger would call it."""
    runs = Executions()
    flow = (Flow("lambda").node("a", runs.node()).node("b", runs.node())
            .node("c", runs.node()).edge("a", "b").edge("a", "c"))
    bp = flow.to_blueprint()
    handler = make_adapter(aws, [bp], flow.registry())
    run_id = await handler.start_workflow(bp, {})
    for _ in range(10):
        messages = await receive_all(aws.sqs, aws.queue_url)
        for message in messages:
            assert await handler.handle_job(message["Body"]) in ("processed", "duplicate")
        if (await handler.get_run_status(run_id))["status"] == "completed":
            break
    assert (await handler.get_run_status(run_id))["status"] == "completed"
    assert dict(runs.counts) == {"a": 1, "b": 1, "c": 1}


async def test_fan_in_all_and_any(aws: Any) -> None:
    runs = Executions()
    flow = (Flow("fanin")
            .node("a", runs.node(lambda ctx: "A"))
            .node("b", runs.node(lambda ctx: "B"))
            .node("c", runs.node(lambda ctx: "C", delay=1.0))
            .node("all", runs.node(lambda ctx: ctx.input), join_strategy="all")
            .node("any", runs.node(lambda ctx: ctx.input), join_strategy="any")
            .edge("a", "b").edge("a", "c")
            .edge("b", "all").edge("c", "all")
            .edge("b", "any").edge("c", "any"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), count=2) as (client, _):
        run_id = await client.start_workflow(bp, {})
        result = await client.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "completed", result.errors
    assert dict(runs.counts) == {"a": 1, "b": 1, "c": 1, "all": 1, "any": 1}
    assert result.context["_outputs.all"] == {"b": "B", "c": "C"}
    assert result.context["_outputs.any"] == "B"  # the first arrival (c is slow)


async def test_conditional_diamond_converges_and_skips_propagate(aws: Any) -> None:
    runs = Executions()
    flow = (Flow("diamond")
            .node("a", runs.node(lambda ctx: ctx.input), inputs="side")
            .node("left", runs.node(lambda ctx: "L"))
            .node("left2", runs.node(lambda ctx: "L2"))
            .node("right", runs.node(lambda ctx: "R"))
            .node("join", runs.node(lambda ctx: ctx.input))
            .node("end", runs.node(lambda ctx: ctx.input))
            .edge("a", "left", condition="result.output == 'left'")
            .edge("a", "right", condition="result.output == 'right'")
            .edge("left", "left2").edge("left2", "join").edge("right", "join")
            .edge("join", "end"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), count=2) as (client, _):
        run_id = await client.start_workflow(bp, {"side": "right"})
        result = await client.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert dict(runs.counts) == {"a": 1, "right": 1, "join": 1, "end": 1}
    assert result.context["_outputs.join"] == {"right": "R"}
    records = json.loads(result.serialized_context)
    assert records["_flowcraft.node.left"]["skipped"] is True
    assert records["_flowcraft.node.left2"]["skipped"] is True


async def test_node_that_always_fails_fails_the_run_and_names_the_node(aws: Any) -> None:
    runs = Executions()

    async def boom(ctx: NodeContext) -> Any:
        runs.record(ctx)
        raise ValueError("card declined (code 42)")

    flow = (Flow("pill").node("a", runs.node()).node("charge", boom, max_retries=2)
            .node("ship", runs.node()).edge("a", "charge").edge("charge", "ship"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "failed"
    assert runs.counts == {"a": 1, "charge": 2}  # maxRetries = total attempts
    (error,) = result.errors
    assert error.node_id == "charge" and "card declined (code 42)" in error.message
    status = await worker.get_run_status(run_id)
    assert status["status"] == "failed" and status["failedNodeId"] == "charge"
    assert "charge" in status["error"] and "card declined" in status["error"]


async def test_message_received_too_often_is_removed_and_its_run_failed(aws: Any) -> None:
    """Crashed attempts (an exception escaping the job algorithm) are counted by SQS; past
    ``max_receive_count`` the message is a poison message."""
    runs = Executions()
    flow = chain("crashy", runs, "a", "b")
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), lease_seconds=1, max_receive_count=2,
                       crash_at={("before_run", "b")}) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "failed"
    assert runs.counts == {"a": 1}
    status = await worker.get_run_status(run_id)
    assert status["failedNodeId"] == "b"
    assert "attempted 3 times" in status["error"] and "poison" in status["error"]
    # b ran first as the local continuation of a's job (attempt 1); that crash made a's
    # message come back, a was done, so b got a message of its own: attempt 2 crashed, and
    # its second delivery was the third attempt, the poison one.
    assert [m.receive_count for m in worker.received_jobs("b")] == [1, 2]


async def test_message_redelivered_past_the_limit_by_dead_workers_still_runs(aws: Any) -> None:
    """Receives are not attempts: workers that died before claiming do not make it poison."""
    runs = Executions()
    flow = chain("dead-workers", runs, "a")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    for _ in range(4):  # four workers took the message and died without a trace
        (message,) = await peek(aws.sqs, aws.queue_url)
    assert int(message["Attributes"]["ApproximateReceiveCount"]) == 4
    async with workers(aws, [bp], flow.registry(), max_receive_count=4) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "completed" and runs.counts["a"] == 1


async def test_resume_with_action_on_a_wait_node(aws: Any) -> None:
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
    async with workers(aws, [bp], flow.registry()) as (worker,):
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


@pytest.mark.parametrize(("lease", "duration"), [(2, 6.0), (0.5, 2.0)],
                         ids=["lease2s-node6s", "fractional-lease"])
async def test_node_longer_than_the_visibility_timeout_runs_exactly_once(
        aws: Any, lease: float, duration: float) -> None:
    await aws.sqs.set_queue_attributes(QueueUrl=aws.queue_url,
                                       Attributes={"VisibilityTimeout": "2"})
    runs = Executions()
    flow = (Flow("slow").node("slow", runs.node(lambda ctx: "done", delay=duration))
            .node("next", runs.node()).edge("slow", "next"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), count=2, lease_seconds=lease) as pool:
        run_id = await pool[0].start_workflow(bp, {})
        result = await pool[0].wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert runs.counts == {"slow": 1, "next": 1}
    # The message stayed invisible all along: no worker received it a second time.
    deliveries = [m for worker in pool for m in worker.received_jobs("slow")]
    assert [m.receive_count for m in deliveries] == [1]


async def test_duplicate_deliveries_run_a_node_once(aws: Any) -> None:
    runs = Executions()
    flow = chain("dups", runs, "a", "b", "c")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    (start,) = await peek(aws.sqs, aws.queue_url)
    for _ in range(2):  # the same job, sent twice more by hand
        await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=start["Body"])
    middle = JobPayload(run_id, bp.id, "b").to_json()
    async with workers(aws, [bp], flow.registry(), count=2, lease_seconds=2):
        result = await client.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url, timeout=20)
        assert runs.counts == {"a": 1, "b": 1, "c": 1}
        # A late duplicate after the run completed changes nothing.
        await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=middle)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "completed"
    assert runs.counts == {"a": 1, "b": 1, "c": 1}
    final = await client.wait_for_result(run_id, timeout=1)
    assert final.context == result.context


async def test_malformed_messages_are_removed_and_logged(
        aws: Any, caplog: pytest.LogCaptureFixture) -> None:
    runs = Executions()
    flow = chain("sane", runs, "a")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    named_run = await client.start_workflow(bp, {})
    await receive_all(aws.sqs, aws.queue_url)  # its start job is lost ...
    bodies = ["garbage {", "", "not base64 !!", json.dumps([1, 2]),
              json.dumps({"runId": named_run, "nodeId": "a"})]  # ... and this one is bad
    ids = [(await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody=body or " "))[
        "MessageId"] for body in bodies]
    caplog.set_level(logging.ERROR, logger="flowcraft")
    async with workers(aws, [bp], flow.registry()) as (worker,):
        await wait_queue_empty(aws.sqs, aws.queue_url)
        # The worker lives on and runs the next run.
        ok = await worker.start_workflow(bp, {})
        assert (await worker.wait_for_result(ok, timeout=20)).status == "completed"
        assert not worker.worker_loop.poll_task.done()
    for message_id in ids:
        assert any(message_id in r.getMessage() and "removed" in r.getMessage()
                   for r in caplog.records), message_id
    status = await client.get_run_status(named_run)
    assert status["status"] == "failed"
    assert "invalid job message" in status["error"] and "blueprintId" in status["error"]


async def test_unknown_blueprint_fails_the_run_and_removes_the_message(aws: Any) -> None:
    runs = Executions()
    known_flow = chain("known", runs, "a")
    known = known_flow.to_blueprint()
    other_flow = chain("elsewhere", runs, "x")
    other = other_flow.to_blueprint()
    client = make_adapter(aws, [other], other_flow.registry())
    run_id = await client.start_workflow(other, {})
    async with workers(aws, [known], known_flow.registry(),
                       unknown_blueprint_grace_seconds=0) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "failed" and runs.counts["x"] == 0
    status = await client.get_run_status(run_id)
    assert "elsewhere" in status["error"]


@pytest.mark.parametrize("graceful", [True, False], ids=["finish", "cancel"])
async def test_stop_mid_run_loses_nothing(aws: Any, graceful: bool) -> None:
    """``stop()`` while a slow node runs. Gracefully (enough time) the node finishes and each
    node runs once; with a short timeout the slow node is cancelled, its lease released and
    its message made visible again, so it runs at most twice (once interrupted, once to
    completion) and its effect lands once."""
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
    first = make_adapter(aws, [bp], flow.registry(), lease_seconds=3)
    await first.start()
    run_id = await first.start_workflow(bp, {})
    await asyncio.wait_for(started.wait(), 10)
    await first.stop(timeout_seconds=10 if graceful else 0.2)
    if graceful:
        assert runs.counts == {"a": 1, "slow": 1, "z": 1}
    async with workers(aws, [bp], flow.registry(), lease_seconds=3) as (second,):
        result = await second.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "completed", result.errors
    assert runs.counts["a"] == 1 and runs.counts["z"] == 1
    assert runs.counts["slow"] == (1 if graceful else 2)
    assert result.context["_outputs.slow"] == "slow-done"
    if not graceful:
        assert second.received_jobs("a"), "the interrupted job came back to a new worker"


async def test_durable_sleep_uses_a_message_delay_and_frees_the_worker(aws: Any) -> None:
    runs = Executions()
    stamps: dict[str, float] = {}

    def stamp(name: str) -> Any:
        def compute(ctx: NodeContext) -> Any:
            stamps[f"{ctx.run_id}:{name}"] = time.monotonic()
            return name
        return compute

    sleepy = (Flow("sleepy").node("before", runs.node(stamp("before"))).sleep("nap", "3s")
              .node("after", runs.node(stamp("after"))).edge("before", "nap").edge("nap", "after"))
    quick = chain("quick", runs, "q1", "q2")
    bps = [sleepy.to_blueprint(), quick.to_blueprint()]
    registry = {**sleepy.registry(), **quick.registry()}
    async with workers(aws, bps, registry, concurrency=1) as (worker,):
        sleeping = await worker.start_workflow(bps[0], {})
        await wait_for(lambda: runs.counts["before"] == 1)
        counts = {}

        async def delayed() -> bool:
            nonlocal counts
            counts = await queue_counts(aws.sqs, aws.queue_url)
            return counts["delayed"] == 1

        await wait_for(delayed, timeout=3)
        # One worker with concurrency 1 is not held by the sleep: another run goes through.
        other = await worker.start_workflow(bps[1], {})
        assert (await worker.wait_for_result(other, timeout=2.5)).status == "completed"
        assert runs.counts["after"] == 0
        result = await worker.wait_for_result(sleeping, timeout=20)
    assert result.status == "completed", result.errors
    waited = stamps[f"{sleeping}:after"] - stamps[f"{sleeping}:before"]
    assert 2.5 <= waited < 8, waited
    assert runs.counts == {"before": 1, "after": 1, "q1": 1, "q2": 1}


class _ShortMaxDelay(RecordingSqsAdapter):
    """SQS delays a message by at most 15 minutes; here by at most 2 s, so that a sleep
    longer than the queue's maximum delay can be tested quickly."""

    max_delay_seconds = 2.0


async def test_sleep_longer_than_the_queues_maximum_delay_is_not_cut_short(aws: Any) -> None:
    runs = Executions()
    stamps: dict[str, float] = {}

    def stamp(ctx: NodeContext) -> Any:
        stamps[ctx.node_id] = time.monotonic()
        return ctx.node_id

    flow = (Flow("long-nap").node("before", runs.node(stamp)).sleep("nap", "5s")
            .node("after", runs.node(stamp)).edge("before", "nap").edge("nap", "after"))
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), cls=_ShortMaxDelay) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        result = await worker.wait_for_result(run_id, timeout=25)
    assert result.status == "completed", result.errors
    assert runs.counts == {"before": 1, "after": 1}
    assert stamps["after"] - stamps["before"] >= 4.5, stamps["after"] - stamps["before"]


async def test_many_start_nodes_are_sent_in_batches_of_ten(aws: Any) -> None:
    runs = Executions()
    flow = Flow("wide").node("join", runs.node(lambda ctx: sorted(ctx.input)))
    for i in range(12):
        flow.node(f"s{i:02d}", runs.node(lambda ctx: ctx.node_id)).edge(f"s{i:02d}", "join")
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), count=2) as (client, _):
        run_id = await client.start_workflow(bp, {})  # SendMessageBatch takes 10 at most
        result = await client.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.join"] == [f"s{i:02d}" for i in range(12)]
    assert set(runs.counts.values()) == {1} and len(runs.counts) == 13


async def test_loop_and_batch_give_the_in_memory_result(aws: Any) -> None:
    runs = Executions()

    async def body(ctx: NodeContext) -> Any:
        runs.record(ctx)
        count = (await ctx.context.get("count") or 0) + 1
        await ctx.context.set("count", count)
        return count

    async def square(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return ctx.input * ctx.input

    flow = (Flow("loop-batch").node("body", body)
            .loop("ctl", start_node_id="body", end_node_id="body", condition="count < 3",
                  max_iterations=10)
            .batch("fan", square, input_key="items", output_key="squares")
            .edge("ctl", "fan"))
    bp = flow.to_blueprint()
    initial = {"items": [1, 2.5, 3]}
    expected = await oracle(bp, flow.registry(), initial, run_id="same-run")
    assert expected.status == "completed", expected.errors
    runs.reset()
    async with workers(aws, [bp], flow.registry(), count=2) as (client, _):
        run_id = await client.start_workflow(bp, initial, run_id="same-run")
        result = await client.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert result.context.get("squares") == [1, 6.25, 9], result.serialized_context
    assert result.context["count"] == 3
    assert comparable(result.context) == comparable(expected.context)
    assert runs.counts["body"] == 3
    assert sum(n for k, n in runs.counts.items() if k.startswith("fan_scatter_worker")) == 3


async def test_dead_letter_queue_from_the_redrive_policy(aws: Any) -> None:
    dlq_name = f"{aws.queue_name}-dlq"
    dlq_url = (await aws.sqs.create_queue(QueueName=dlq_name))["QueueUrl"]
    dlq_arn = (await aws.sqs.get_queue_attributes(
        QueueUrl=dlq_url, AttributeNames=["QueueArn"]))["Attributes"]["QueueArn"]
    await aws.sqs.set_queue_attributes(QueueUrl=aws.queue_url, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "10"})})
    runs = Executions()
    flow = chain("redrive", runs, "a")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    for _ in range(2):
        await peek(aws.sqs, aws.queue_url)
    await aws.sqs.send_message(QueueUrl=aws.queue_url, MessageBody="{broken")
    async with workers(aws, [bp], flow.registry(), max_receive_count=2,
                       hard_receive_limit=2) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=20)
        await wait_queue_empty(aws.sqs, aws.queue_url)
    assert result.status == "failed" and runs.counts["a"] == 0
    dead = await receive_all(aws.sqs, dlq_url)
    bodies = sorted(m["Body"] for m in dead)
    assert bodies == sorted([JobPayload(run_id, bp.id, "a").to_json(), "{broken"])
    reasons = [m["MessageAttributes"]["flowcraftError"]["StringValue"] for m in dead]
    assert any("received 3 times" in r for r in reasons)
    assert any("not valid JSON" in r for r in reasons)


# =============================================================================================
# create_sqs_reconciler
# =============================================================================================


async def test_reconciler_resumes_a_run_whose_messages_were_lost(aws: Any) -> None:
    runs = Executions()
    flow = chain("lossy", runs, "a", "b")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    run_id = await client.start_workflow(bp, {})
    await receive_all(aws.sqs, aws.queue_url)  # the start job is lost

    patient = create_sqs_reconciler(client, aws.dynamodb, aws.status_table, 300)
    stats = await patient.run()
    # The status index returns only runs not updated within the threshold: none yet.
    assert (stats.scanned_items, stats.stalled_runs, stats.reconciled_runs) == (0, 0, 0)

    reconciler = create_sqs_reconciler(client, aws.dynamodb, aws.status_table,
                                       stalled_threshold_seconds=0)
    stats = await reconciler.run()
    assert (stats.scanned_items, stats.stalled_runs, stats.reconciled_runs,
            stats.failed_runs) == (1, 1, 1, 0)
    async with workers(aws, [bp], flow.registry()):
        result = await client.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"a": 1, "b": 1}
    stats = await reconciler.run()  # completed runs are not looked at
    assert (stats.scanned_items, stats.stalled_runs) == (0, 0)


async def test_reconciler_needs_no_node_implementations(aws: Any) -> None:
    """A reconciler (a cron job, ``flowcraft reconcile aws``) has the blueprints but need
    not import the nodes' code: it runs no node."""
    runs = Executions()
    flow = chain("no-code", runs, "a", "b")
    bp = flow.to_blueprint()
    reconciling = make_adapter(aws, [bp], {})
    run_id = await reconciling.start_workflow(bp, {})
    await receive_all(aws.sqs, aws.queue_url)  # the start job is lost
    stats = await create_sqs_reconciler(reconciling, aws.dynamodb, aws.status_table, 0).run()
    assert (stats.stalled_runs, stats.reconciled_runs, stats.failed_runs) == (1, 1, 0)
    (job,) = [json.loads(m["Body"]) for m in await receive_all(aws.sqs, aws.queue_url)]
    assert job == {"runId": run_id, "blueprintId": "no-code", "nodeId": "a"}


class _PagedScans:
    """The real client, but every Scan returns at most ``limit`` items per page."""

    def __init__(self, client: Any, limit: int) -> None:
        self._client = client
        self.limit = limit
        self.pages = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def scan(self, **arguments: Any) -> Any:
        self.pages += 1
        return await self._client.scan(**arguments, Limit=self.limit)


async def test_reconciler_reads_every_page_and_both_timestamp_forms(aws: Any) -> None:
    # A status table provisioned before the status index existed (numeric lastUpdated
    # values, which an index on a string range key refuses): the reconciler scans it.
    await aws.dynamodb.delete_table(TableName=aws.status_table)
    await aws.dynamodb.create_table(
        TableName=aws.status_table, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "runId", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "runId", "KeyType": "HASH"}])
    runs = Executions()
    flow = chain("pages", runs, "a")
    bp = flow.to_blueprint()
    client = make_adapter(aws, [bp], flow.registry())
    old_iso = "2020-01-01T00:00:00.000Z"
    stale = {"iso": old_iso, "epoch": int(time.time()) - 3600, "epoch_ms":
             int(time.time() * 1000) - 3_600_000, "iso_offset": "2020-01-01T01:00:00+01:00"}
    run_ids = {}
    for name, last_updated in stale.items():
        run_ids[name] = await client.start_workflow(bp, {})
        await aws.dynamodb.update_item(
            TableName=aws.status_table, Key={"runId": {"S": run_ids[name]}},
            UpdateExpression="SET lastUpdated = :t",
            ExpressionAttributeValues={":t": {"N": str(last_updated)} if isinstance(
                last_updated, int) else {"S": last_updated}})
    fresh = [await client.start_workflow(bp, {}) for _ in range(3)]
    await receive_all(aws.sqs, aws.queue_url)  # every start job is lost
    paged = _PagedScans(aws.dynamodb, limit=2)
    reconciler = create_sqs_reconciler(client, paged, aws.status_table, 600)
    stats = await reconciler.run()
    assert paged.pages >= 4
    assert stats.scanned_items == 7
    assert (stats.stalled_runs, stats.reconciled_runs, stats.failed_runs) == (4, 4, 0)
    jobs = [json.loads(m["Body"]) for m in await receive_all(aws.sqs, aws.queue_url)]
    assert sorted(j["runId"] for j in jobs) == sorted(run_ids.values())
    assert all(j["nodeId"] == "a" for j in jobs)
    assert not set(fresh) & {j["runId"] for j in jobs}
    # Reconciled runs got a fresh lastUpdated: the next pass leaves them alone.
    assert (await reconciler.run()).stalled_runs == 0


async def test_reconcile_does_not_enqueue_a_node_that_is_running(aws: Any) -> None:
    runs = Executions()
    release = asyncio.Event()

    async def held(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await release.wait()
        return NodeResult(output="held")

    flow = Flow("held").node("held", held)
    bp = flow.to_blueprint()
    async with workers(aws, [bp], flow.registry(), lease_seconds=2) as (worker,):
        run_id = await worker.start_workflow(bp, {})
        await wait_for(lambda: runs.counts["held"] == 1)
        reconciler = create_sqs_reconciler(worker, aws.dynamodb, aws.status_table, 0)
        stats = await reconciler.run()
        assert stats.reconciled_runs == 1
        assert await worker.reconcile(run_id) == []  # leased: not re-enqueued
        release.set()
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed" and runs.counts == {"held": 1}


def test_key_components_are_exported() -> None:
    import flowcraft.adapters.aws as aws_adapter

    assert {"SqsAdapter", "DynamoDbContext", "DynamoDbCoordinationStore",
            "create_sqs_reconciler"} <= set(aws_adapter.__all__)


async def test_context_key_named_like_the_item_key_round_trips(aws: Any) -> None:
    """``runId`` is the item's key: a context key of that name is stored aside (``~runId``),
    never dropped, and a key starting with ``~`` cannot be mistaken for it."""
    context = DynamoDbContext(str(uuid.uuid4()), client=aws.dynamodb,
                              table_name=aws.context_table)
    initial = {"runId": "the caller's own id", "~runId": "tilde", "~": 1, "plain": 2}
    await context.create(initial)
    assert await context.load() == initial
    await context.set("runId", "changed")
    await context.patch([PatchOperation("set", "~x", 3)])
    assert await context.to_dict() == {**initial, "runId": "changed", "~x": 3}
    assert await context.delete("runId") is True
    assert "runId" not in await context.to_dict()
    raw = await raw_item(aws, aws.context_table, {"runId": context.run_id})
    assert raw is not None and raw["runId"] == {"S": context.run_id}
