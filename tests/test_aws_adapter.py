"""What only the AWS backend does, against a real moto server on loopback (no SDK mocks):
provisioning, ``DynamoDbCoordinationStore``'s items on the AWS guide's table schema,
``DynamoDbContext``'s item layout (numbers without ``Decimal``, the TypeScript client's
nested context, the item key), SQS specifics (receive counts of workers that died, poison
messages and the redrive policy's dead-letter queue, delays longer than SQS allows, batches
of ten) and the reconciler's paged scans.

What every backend does is tested once for all of them: tests/test_backends.py (workers and
clients), tests/test_run_store_contract.py (``DynamoDbContext``) and
tests/test_coordination_store.py (``DynamoDbCoordinationStore``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from distributed_helpers import Executions
from flowcraft import (
    Flow,
    FlowcraftError,
    NodeContext,
)
from flowcraft.adapters.aws import (
    AwsNames,
    DynamoDbContext,
    DynamoDbCoordinationStore,
    create_sqs_reconciler,
    provision_aws,
)
from flowcraft.distributed.job import JobPayload

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


async def test_provision_creates_exactly_the_guides_resources_and_is_idempotent(moto: Any) -> None:
    from aiobotocore.session import get_session

    # A region of its own: the session's moto server holds other tests' resources, and
    # queues and tables are per region, so "exactly these" can be checked.
    options = {"region_name": "eu-north-1", "endpoint_url": moto.url,
               "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    session = get_session()
    async with session.create_client("sqs", **options) as sqs, session.create_client(
        "dynamodb", **options
    ) as dynamodb:
        first = await provision_aws(sqs, dynamodb)  # the AWS guide's default names
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

        # A coordination table made for the TypeScript library (key 'coordinationKey') is not
        # the AWS guide's schema: provisioning says so instead of using it.
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
# DynamoDbCoordinationStore: items on the AWS guide's schema
# =============================================================================================


_SESSION: Any = None
CONTRACT_TABLE = "contract-coordination"


@pytest.fixture
async def coordination_table(moto: Any) -> AsyncIterator[tuple[Any, str]]:
    """A DynamoDB client and a coordination table of the AWS guide's schema, shared by these
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


def key() -> str:
    return f"flowcraft:test:{uuid.uuid4().hex[:8]}"


async def _coordination_item(client: Any, table: str, k: str) -> dict[str, Any] | None:
    response = await client.get_item(TableName=table, Key={"key": {"S": k}},
                                     ConsistentRead=True)
    return response.get("Item")


async def test_dynamodb_coordination_items_use_the_guides_schema(
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


async def test_context_flattens_the_typescript_clients_nested_context(aws: Any) -> None:
    """The TypeScript library's client writes ``{runId, context: initialContext}``."""
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


# =============================================================================================
# SqsAdapter: the worker and the client
# =============================================================================================


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

        async def delayed() -> bool:
            counts = await queue_counts(aws.sqs, aws.queue_url)
            return counts == {"visible": 0, "in_flight": 0, "delayed": 1}

        # The successor waits in the queue as a delayed message (DelaySeconds), held by no
        # worker, then is delayed again for the rest of the sleep.
        await wait_for(delayed, timeout=3, interval=0.02)
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


async def test_context_key_named_like_the_item_key_is_stored_aside(aws: Any) -> None:
    """``runId`` is the item's key: a context key of that name is stored aside (``~runId``),
    and a key starting with ``~`` gets one more, so neither can be mistaken for the other
    (that every key round-trips is the run store contract's)."""
    context = DynamoDbContext(str(uuid.uuid4()), client=aws.dynamodb,
                              table_name=aws.context_table)
    initial = {"runId": "the caller's own id", "~runId": "tilde", "~": 1, "plain": 2}
    await context.create(initial)
    assert await context.load() == initial
    raw = await raw_item(aws, aws.context_table, {"runId": context.run_id})
    assert raw is not None
    assert {k: v for k, v in raw.items() if k != "_flowcraft.flat"} == {
        "runId": {"S": context.run_id}, "~runId": {"S": "the caller's own id"},
        "~~runId": {"S": "tilde"}, "~~": {"N": "1"}, "plain": {"N": "2"}}


async def test_records_are_stored_as_text_and_records_stored_as_maps_still_count(
        aws: Any) -> None:
    """A routing record is stored as ``<count, 10 digits>|<JSON>``; the claim's condition
    reads the count from it. Items written before, with records as maps, read and claim as
    they did."""
    from flowcraft.context import PatchOperation
    from flowcraft.distributed.context import ClaimStatus

    context = DynamoDbContext(str(uuid.uuid4()), client=aws.dynamodb,
                              table_name=aws.context_table)
    await context.create({"x": 1})
    claim = await context.claim("a", 0, "w/1", 30)
    assert claim.status is ClaimStatus.CLAIMED
    record = {"n": 1, "taken": [0, 2], "by": "3f9c2a1b", "t": 1795745779.49508}
    await context.commit("a", 0, "w/1", [PatchOperation("set", "_flowcraft.node.a", record)])
    raw = await raw_item(aws, aws.context_table, {"runId": context.run_id})
    assert raw is not None
    assert raw["_flowcraft.node.a"] == {"S": "0000000001|3f9c2a1b|1795745779.49508|0,2"}
    assert (await context.load() or {})["_flowcraft.node.a"] == record
    await context.apply([PatchOperation("set", "_flowcraft.node.b", {"n": 3, "skipped": True})])
    raw = await raw_item(aws, aws.context_table, {"runId": context.run_id})
    assert raw is not None and raw["_flowcraft.node.b"] == {"S": '0000000003|{"skipped":true}'}
    assert (await context.load() or {})["_flowcraft.node.b"] == {"n": 3, "skipped": True}
    assert (await context.claim("a", 0, "w/2", 30)).status is ClaimStatus.DONE
    assert (await context.claim("a", 1, "w/2", 30)).status is ClaimStatus.CLAIMED

    old = DynamoDbContext(str(uuid.uuid4()), client=aws.dynamodb, table_name=aws.context_table)
    await aws.dynamodb.put_item(TableName=aws.context_table, Item={
        "runId": {"S": old.run_id}, "_flowcraft.flat": {"BOOL": True},
        "_flowcraft.node.a": {"M": {"n": {"N": "2"}, "taken": {"L": []}}}})
    assert (await old.load() or {})["_flowcraft.node.a"] == {"n": 2, "taken": []}
    assert (await old.claim("a", 1, "w/1", 30)).status is ClaimStatus.DONE
    assert (await old.claim("a", 2, "w/1", 30)).status is ClaimStatus.CLAIMED


_records = st.fixed_dictionaries(
    {"n": st.integers(1, 10**9)},
    optional={"taken": st.lists(st.integers(0, 500), max_size=5),
              "by": st.text("0123456789abcdef|", min_size=1, max_size=8),
              "t": st.floats(0, 2e9, allow_nan=False), "action": st.text(max_size=6),
              "skipped": st.just(True), "error": st.text(max_size=10)})


@given(_records, st.integers(0, 10**9))
def test_a_record_round_trips_as_text_and_orders_by_its_count(record: dict[str, Any],
                                                             iteration: int) -> None:
    from flowcraft.adapters.aws.context import loaded_value, stored_value

    text = stored_value("_flowcraft.node.x", record)
    assert isinstance(text, str)
    assert loaded_value("_flowcraft.node.x", text) == record
    # The claim's condition: "not completed at iteration" is text < the next count's digits.
    assert (text < f"{iteration + 1:010d}") == (record["n"] <= iteration)
    assert stored_value("plain", record) is record
