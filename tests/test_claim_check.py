"""The claim check: values too large for a run's item live in S3 (moto) or Blob Storage
(Azurite), the item holds references, and every read returns the values themselves.

Each test runs on both stacks, through what a deployment uses: settings with a payload
bucket or container, ``flowcraft provision`` (``adapters.connect.provision``) and the
adapters ``adapters.connect`` opens. Requests to the object stores are counted by the
clients' own hooks (``s3.PutObject``, ``blob.PUT``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aws_helpers
import azure_helpers
from distributed_helpers import comparable, oracle
from flowcraft import ContextTooLargeError, Flow, FlowRuntime, NodeContext, WorkflowBlueprint
from flowcraft.adapters import connect
from flowcraft.adapters.aws.context import loaded_value
from flowcraft.adapters.claimcheck import (
    REFERENCE_KEY,
    PayloadMissingError,
    PayloadStore,
    PayloadStoreMissingError,
)
from flowcraft.client import Client
from flowcraft.context import PatchOperation
from flowcraft.distributed.context import (
    LOCK_PREFIX,
    ClaimStatus,
    DistributedContext,
    InMemoryRunStore,
)

pytestmark = pytest.mark.integration

OWNER = "Worker-A:1"
BIG = 200_000
"""Characters of each large value: six of them make a run of more than 1 MB."""
SMALL_ITEM = 64 * 1024


def big_value(tag: str, size: int = BIG) -> dict[str, Any]:
    rows = [{"i": i, "tag": tag, "text": f"{tag}-{i:06d}-" + "x" * 80}
            for i in range(size // 100)]
    return {"tag": tag, "rows": rows}


class Stack(abc.ABC):
    """One cloud stack with the claim check on: its settings, and a look at its stores."""

    name: str
    put: str
    """The request that uploads an object, as the call counter names it."""
    head: str
    """The request that asks whether an object is there."""
    fast: dict[str, Any]
    """Adapter options that keep the tests quick."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings

    @contextlib.asynccontextmanager
    async def adapter(self, runtime: FlowRuntime, calls: Counter[str] | None = None,
                      **options: Any) -> AsyncIterator[Any]:
        """A worker and client as ``flowcraft worker`` opens one (adapters.connect)."""
        async with connect.open_adapter(self.settings, runtime.options, calls,
                                        **{**self.fast, **options}) as adapter:
            yield adapter

    @abc.abstractmethod
    def store(self, calls: Counter[str] | None = None,
              **options: Any) -> contextlib.AbstractAsyncContextManager[PayloadStore]:
        """A payload store of its own (another worker process's: an empty cache)."""

    @abc.abstractmethod
    def context(self, run_id: str, payloads: PayloadStore | None) -> DistributedContext:
        """The stored context of a run, with ``payloads`` as its payload store."""

    @abc.abstractmethod
    def own_client(self, blueprint: WorkflowBlueprint, payloads: PayloadStore) -> Client:
        """A Client on SDK clients the test owns (``Client.from_aws`` / ``from_azure``)."""

    @abc.abstractmethod
    async def raw_item(self, run_id: str) -> dict[str, Any]:
        """The run's item as the database holds it."""

    @abc.abstractmethod
    async def raw_items(self, prefix: str) -> list[dict[str, Any]]:
        """Every item of the contexts table or container whose run id starts with
        ``prefix`` (a run's item and its map ledger's chunks)."""

    @abc.abstractmethod
    async def objects(self) -> list[str]:
        """The names of the objects in the bucket or container."""

    @abc.abstractmethod
    async def delete_object(self, name: str) -> None: ...


class AwsStack(Stack):
    name = "aws"
    put = "s3.PutObject"
    head = "s3.HeadObject"
    fast = aws_helpers.FAST

    def __init__(self, settings: Any, aws: Any) -> None:
        super().__init__(settings)
        self.aws = aws

    @contextlib.asynccontextmanager
    async def store(self, calls: Counter[str] | None = None,
                    **options: Any) -> AsyncIterator[PayloadStore]:
        from flowcraft.adapters.aws.payloads import S3PayloadStore

        async with connect.aws_s3_client(self.settings, calls) as s3:
            yield S3PayloadStore(s3, self.settings.payload_bucket, **options)

    def context(self, run_id: str, payloads: PayloadStore | None) -> DistributedContext:
        from flowcraft.adapters.aws import DynamoDbContext

        return DynamoDbContext(run_id, client=self.aws.dynamodb,
                               table_name=self.settings.context_table, payloads=payloads)

    def own_client(self, blueprint: WorkflowBlueprint, payloads: PayloadStore) -> Client:
        return Client.from_aws(
            self.aws.sqs, self.aws.dynamodb, self.settings.queue_url, blueprints=[blueprint],
            context_table=self.settings.context_table, status_table=self.settings.status_table,
            coordination_table=self.settings.coordination_table, payloads=payloads)

    async def raw_item(self, run_id: str) -> dict[str, Any]:
        from flowcraft.adapters.aws._dynamo import from_item

        item = await aws_helpers.raw_item(self.aws, self.settings.context_table,
                                          {"runId": run_id})
        assert item is not None
        return from_item(item)

    async def raw_items(self, prefix: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        arguments: dict[str, Any] = {
            "TableName": self.settings.context_table, "ConsistentRead": True,
            "FilterExpression": "begins_with(runId, :p)",
            "ExpressionAttributeValues": {":p": {"S": prefix}}}
        while True:
            page = await self.aws.dynamodb.scan(**arguments)
            items += page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return items
            arguments["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    async def objects(self) -> list[str]:
        async with connect.aws_s3_client(self.settings) as s3:
            listed = await s3.list_objects_v2(Bucket=self.settings.payload_bucket)
        return sorted(entry["Key"] for entry in listed.get("Contents", []))

    async def delete_object(self, name: str) -> None:
        async with connect.aws_s3_client(self.settings) as s3:
            await s3.delete_object(Bucket=self.settings.payload_bucket, Key=name)


class AzureStack(Stack):
    name = "azure"
    put = "blob.PUT"
    head = "blob.HEAD"
    fast = azure_helpers.FAST

    def __init__(self, settings: Any, azure: Any) -> None:
        super().__init__(settings)
        self.azure = azure

    @contextlib.asynccontextmanager
    async def store(self, calls: Counter[str] | None = None,
                    **options: Any) -> AsyncIterator[PayloadStore]:
        from flowcraft.adapters.azure.payloads import BlobPayloadStore

        async with connect.azure_blob_service(self.settings, calls) as service:
            yield BlobPayloadStore(service, self.settings.payload_container, **options)

    def context(self, run_id: str, payloads: PayloadStore | None) -> DistributedContext:
        from flowcraft.adapters.azure import CosmosDbContext

        return CosmosDbContext(run_id, client=self.azure.cosmos,
                               database_name=self.settings.database,
                               container_name=self.settings.context_container,
                               payloads=payloads)

    def own_client(self, blueprint: WorkflowBlueprint, payloads: PayloadStore) -> Client:
        return Client.from_azure(
            self.azure.queue, self.azure.cosmos, self.azure.redis, blueprints=[blueprint],
            database=self.settings.database, context_container=self.settings.context_container,
            status_container=self.settings.status_container, payloads=payloads)

    async def raw_item(self, run_id: str) -> dict[str, Any]:
        container = self.azure.cosmos.get_database_client(
            self.settings.database).get_container_client(self.settings.context_container)
        return dict(await container.read_item(run_id, partition_key=run_id))

    async def raw_items(self, prefix: str) -> list[dict[str, Any]]:
        container = self.azure.cosmos.get_database_client(
            self.settings.database).get_container_client(self.settings.context_container)
        query = "SELECT * FROM c WHERE STARTSWITH(c.id, @prefix)"
        return [dict(item) async for item in container.query_items(
            query, parameters=[{"name": "@prefix", "value": prefix}])]

    async def objects(self) -> list[str]:
        async with connect.azure_blob_service(self.settings) as service:
            container = service.get_container_client(self.settings.payload_container)
            return sorted([blob.name async for blob in container.list_blobs()])

    async def delete_object(self, name: str) -> None:
        async with connect.azure_blob_service(self.settings) as service:
            await service.get_blob_client(self.settings.payload_container, name).delete_blob()


@pytest.fixture(params=["aws", "azure"])
def _stack(request: pytest.FixtureRequest) -> Stack:
    suffix = uuid.uuid4().hex[:8]
    if request.param == "aws":
        aws = request.getfixturevalue("aws")
        return AwsStack(connect.AwsSettings(
            region="us-east-1", endpoint_url=aws.endpoint.url, queue_url=aws.queue_url,
            queue_name=aws.queue_name, context_table=aws.context_table,
            status_table=aws.status_table, coordination_table=aws.coordination_table,
            payload_bucket=f"payloads-{suffix}"), aws)
    azure = request.getfixturevalue("azure")
    endpoints = azure.services.endpoints
    return AzureStack(connect.AzureSettings(
        storage_connection_string=endpoints.storage_connection_string,
        cosmos_connection_string=endpoints.cosmos_connection_string,
        redis_url=endpoints.redis_url, queue_name=azure.queue_name, database=azure.database,
        context_container=azure.context_container, status_container=azure.status_container,
        payload_container=f"payloads-{suffix}", verify_tls=False), azure)


@pytest.fixture
async def stack(_stack: Stack) -> Stack:
    """A stack whose bucket or container ``flowcraft provision`` just made."""
    provisioned = await connect.provision(_stack.settings)
    assert any("payloads-" in line for line in provisioned["created"]), provisioned
    return _stack


def item_size(item: dict[str, Any]) -> int:
    return len(json.dumps(item, default=str).encode())


# -- a run larger than any item --------------------------------------------------------------


def large_flow() -> Flow:
    """Six branches of 200 KB each (one also writes a 200 KB context key) into a join that
    checks it got every value whole."""

    def branch(ctx: NodeContext) -> Any:
        return big_value(ctx.node_id)

    async def with_key(ctx: NodeContext) -> Any:
        await ctx.context.set("report", big_value("report"))
        return big_value(ctx.node_id)

    async def join(ctx: NodeContext) -> Any:
        document = await ctx.context.get("document")
        report = await ctx.context.get("report")
        values = {**ctx.input, "document": document, "report": report}
        assert all(v == big_value(k) for k, v in values.items()), "a value came back changed"
        return {"sizes": {k: len(json.dumps(v)) for k, v in sorted(values.items())}}

    flow = Flow("large").node("start", lambda ctx: "go")
    for index in range(6):
        flow.node(f"b{index}", with_key if index == 0 else branch)
        flow.edge("start", f"b{index}").edge(f"b{index}", "join")
    return flow.node("join", join)


async def test_a_run_of_more_than_a_megabyte_completes_with_small_items(stack: Stack) -> None:
    flow = large_flow()
    blueprint = flow.to_blueprint()
    initial = {"document": big_value("document"), "tenant": "t1"}
    run_id = f"large-{uuid.uuid4().hex[:6]}"
    expected = await oracle(blueprint, flow.registry(), initial, run_id=run_id)
    assert expected.status == "completed", expected.errors
    runtime = FlowRuntime(blueprints={blueprint.id: blueprint}, registry=flow.registry())
    calls: Counter[str] = Counter()
    async with stack.adapter(runtime, calls) as first, stack.adapter(runtime, calls) as second:
        await first.start()
        await second.start()
        try:
            await first.start_workflow(blueprint, initial, run_id=run_id)
            result = await first.wait_for_result(run_id, timeout=60)
        finally:
            await first.stop(5)
            await second.stop(5)
    assert result.status == "completed", result.errors
    assert comparable(result.context) == comparable(expected.context)
    outputs = [v for k, v in result.context.items() if k.startswith("_outputs.b")]
    assert len(json.dumps(outputs)) > 1_000_000
    # The item holds references only: small, whatever the run's size.
    item = await stack.raw_item(run_id)
    assert item_size(item) < SMALL_ITEM
    references = {k: v for k, v in item.items() if isinstance(v, dict) and REFERENCE_KEY in v}
    assert {"document", "report", *(f"_outputs.b{i}" for i in range(6))} <= set(references)
    assert item["tenant"] == "t1"  # small values stay in the item
    # Each object was uploaded once, though every commit and claim of the run saw them.
    objects = await stack.objects()
    assert all(name.startswith(f"flowcraft/{run_id}/") for name in objects)
    assert len(objects) == len({v["sha256"] for v in references.values()})
    assert calls[stack.put] == len(objects)
    # A reader that never saw the run (no cache) gets the values back.
    async with stack.store() as store:
        context = stack.context(run_id, store)
        assert await context.get("report") == big_value("report")
        stored = await context.to_dict()
    public = comparable(expected.context)
    assert {key: stored[key] for key in public} == public


async def test_a_map_of_2000_items_keeps_every_item_under_16_kb(stack: Stack) -> None:
    """A ``batch-scatter`` over 2,000 items runs as a map ledger: its items and results live
    in chunk items of their own, the list and the results in the object store, and no item
    of the run grows with the map."""

    async def square(ctx: NodeContext) -> dict[str, Any]:
        return {"i": ctx.input, "square": ctx.input * ctx.input}

    flow = (Flow("big-map")
            .batch("fan", square, input_key="items", output_key="results")
            .node("count", lambda ctx: len(ctx.input)).edge("fan", "count"))
    blueprint = flow.to_blueprint()
    runtime = FlowRuntime(blueprints={blueprint.id: blueprint}, registry=flow.registry())
    run_id = f"map-{uuid.uuid4().hex[:6]}"
    async with stack.adapter(runtime) as first, stack.adapter(runtime) as second:
        await first.start()
        await second.start()
        try:
            await first.start_workflow(blueprint, {"items": list(range(2000))}, run_id=run_id)
            result = await first.wait_for_result(run_id, timeout=240)
        finally:
            await first.stop(5)
            await second.stop(5)
    assert result.status == "completed", result.errors
    assert result.context["results"] == [{"i": i, "square": i * i} for i in range(2000)]
    assert result.context["_outputs.count"] == 2000
    items = await stack.raw_items(run_id)
    chunks = [item for item in items if "~map~" in str(item.get("runId", item.get("id")))]
    assert len(chunks) == 20, len(chunks)
    sizes = sorted(item_size(item) for item in items)
    assert sizes[-1] < 16 * 1024, sizes[-5:]


async def test_a_client_on_its_own_sdk_clients_reads_the_large_values(stack: Stack) -> None:
    flow = Flow("one-large").node("make", lambda ctx: big_value("make"))
    blueprint = flow.to_blueprint()
    runtime = FlowRuntime(blueprints={blueprint.id: blueprint}, registry=flow.registry())
    async with stack.adapter(runtime) as worker:
        await worker.start()
        try:
            run_id = await worker.start_workflow(blueprint, {})
            await worker.wait_for_result(run_id, timeout=30)
        finally:
            await worker.stop(5)
    async with stack.store() as store:
        result = await stack.own_client(blueprint, store).result(run_id, timeout=10)
    assert result.status == "completed"
    assert result.context["_outputs.make"] == big_value("make")


# -- content addressing ------------------------------------------------------------------------


async def test_a_redelivered_commit_does_not_upload_again(stack: Stack) -> None:
    """Worker A's lease expires while its node runs; the job is redelivered to worker B,
    which takes the node over. A's commit uploads the output and is refused (lease lost);
    B's commit of the same output finds the object there and uploads nothing."""
    run_id = f"redelivered-{uuid.uuid4().hex[:6]}"
    output = big_value("n")
    calls: Counter[str] = Counter()
    async with stack.store(calls) as store_a, stack.store(calls) as store_b:
        worker_a, worker_b = stack.context(run_id, store_a), stack.context(run_id, store_b)
        await worker_a.create({"tenant": "t1"})
        claim = await worker_a.claim("n", 0, "worker-a", lease_seconds=0.2)
        assert claim.status is ClaimStatus.CLAIMED
        await asyncio.sleep(0.4)
        assert (await worker_b.claim("n", 0, "worker-b", lease_seconds=30)).status is (
            ClaimStatus.CLAIMED)
        write = [PatchOperation("set", "_outputs.n", output)]
        assert await worker_a.commit("n", 0, "worker-a", write) is None  # lease lost
        assert calls[stack.put] == 1
        committed = await worker_b.commit("n", 0, "worker-b", write)
        assert committed is not None and committed["_outputs.n"] == output
        assert calls[stack.put] == 1  # B asked, found it, and did not upload
        assert calls[stack.head] == 2
        # The same worker retrying the same write does not even ask.
        assert await worker_a.commit("n", 0, "worker-a", write) is None
        assert (calls[stack.put], calls[stack.head]) == (1, 2)
    assert len(await stack.objects()) == 1


# -- errors ------------------------------------------------------------------------------------


async def test_a_missing_object_names_the_run_the_key_and_what_to_do(stack: Stack) -> None:
    run_id = f"missing-{uuid.uuid4().hex[:6]}"
    async with stack.store() as store:
        await stack.context(run_id, store).create({"document": big_value("document")})
    (name,) = await stack.objects()
    await stack.delete_object(name)
    async with stack.store() as fresh:
        with pytest.raises(PayloadMissingError) as caught:
            await stack.context(run_id, fresh).load()
    message = str(caught.value)
    assert f"run '{run_id}'" in message and "'document'" in message
    assert name in message and "Restore the object" in message
    assert caught.value.run_id == run_id and caught.value.key == "document"
    # A claim, too, returns the context: it fails the same way.
    async with stack.store() as fresh:
        with pytest.raises(PayloadMissingError):
            await stack.context(run_id, fresh).claim("n", 0, "worker", lease_seconds=30)


async def test_without_a_store_values_stay_in_the_item_up_to_its_limit(stack: Stack) -> None:
    run_id = f"nostore-{uuid.uuid4().hex[:6]}"
    huge = {"document": "x" * (2 * 1024 * 1024 + 1)}  # over both item limits
    context = stack.context(run_id, None)
    with pytest.raises(ContextTooLargeError):
        await context.create(huge)
    await context.create({"document": big_value("document")})
    assert item_size(await stack.raw_item(run_id)) > BIG
    assert await stack.objects() == []
    # With a store, the same value goes to the object store.
    other = f"store-{uuid.uuid4().hex[:6]}"
    async with stack.store() as store:
        context = stack.context(other, store)
        await context.create(huge)
        assert (await context.load() or {})["document"] == huge["document"]
    assert item_size(await stack.raw_item(other)) < SMALL_ITEM
    # A process without a store cannot read that run, and says what to configure.
    with pytest.raises(PayloadStoreMissingError, match="FLOWCRAFT_PAYLOAD_"):
        await stack.context(other, None).load()


async def test_the_threshold_decides_and_none_turns_uploads_off(stack: Stack) -> None:
    value = {"text": "y" * 2000}  # about 2 KB of JSON
    async with stack.store(threshold_bytes=1024) as low, stack.store(
            threshold_bytes=None) as off:
        context = stack.context("low-" + uuid.uuid4().hex[:6], low)
        await context.create({"v": value, "small": "s"})
        assert await context.get("v") == value
        assert len(await stack.objects()) == 1
        context = stack.context("off-" + uuid.uuid4().hex[:6], off)
        await context.create({"v": {"text": "z" * 40_000}})
        await context.apply([PatchOperation("set", "w", {"text": "w" * 40_000})])
        assert len(await stack.objects()) == 1


async def test_a_value_shaped_like_a_reference_reads_back_as_written(stack: Stack) -> None:
    lookalike = {REFERENCE_KEY: "s3://elsewhere/x", "bytes": 1, "sha256": "0" * 64}
    run_id = f"lookalike-{uuid.uuid4().hex[:6]}"
    async with stack.store() as store:
        context = stack.context(run_id, store)
        await context.create({"v": lookalike})
        assert await context.get("v") == lookalike
        await context.apply([PatchOperation("set", "w", lookalike)])
    async with stack.store() as fresh:
        data = await stack.context(run_id, fresh).load() or {}
    assert data["v"] == lookalike and data["w"] == lookalike


# -- the context's operations, unchanged -------------------------------------------------------


def _without_expiry(data: dict[str, Any] | None) -> dict[str, Any] | None:
    """A context with its leases' expiry times dropped (they are taken from the clock)."""
    if data is None:
        return None
    return {key: ({k: v for k, v in value.items() if k != "expires"}
                  if key.startswith(LOCK_PREFIX) else value) for key, value in data.items()}


async def test_every_operation_returns_what_the_in_memory_store_returns(stack: Stack) -> None:
    """With a threshold of 0 every string, list and object written goes to the object store;
    create, claim, commit, apply, release and load still return exactly what the in-memory
    store returns, and the item holds references for them."""
    run_id = f"ops-{uuid.uuid4().hex[:6]}"
    memory = InMemoryRunStore().context(run_id)
    async with stack.store(threshold_bytes=0) as store:
        stored = stack.context(run_id, store)
        both = (memory, stored)

        async def same(call: Any) -> Any:
            results = [await call(context) for context in both]
            assert results[0] == results[1]
            return results[0]

        await same(lambda c: c.create({"order": {"id": "o-1", "lines": [1, 2]}, "note": "n",
                                       "count": 3}))
        claim = await same(lambda c: _claim(c, "a"))
        assert claim[0] is ClaimStatus.CLAIMED
        await same(lambda c: _commit(c, "a", [
            PatchOperation("set", "_outputs.a", {"total": 7, "items": ["x", "y"]}),
            PatchOperation("set", "_flowcraft.node.a", {"n": 1, "taken": ["b"]}),
            PatchOperation("set", "note", "changed"),
            PatchOperation("delete", "order")], claims=[("b", 0)]))
        await same(lambda c: _apply(c, [PatchOperation("set", "tags", ["t1", "t2"])]))
        await same(lambda c: _release(c, "b"))
        assert (await same(lambda c: _claim(c, "a")))[0] is ClaimStatus.DONE
        await same(lambda c: _load(c))
    item = await stack.raw_item(run_id)
    for key in ("note", "tags", "_outputs.a"):
        assert REFERENCE_KEY in item[key], key
    # Records are never moved out (DynamoDB holds them as text: loaded_value reads it back).
    assert item["count"] == 3
    assert loaded_value("_flowcraft.node.a", item["_flowcraft.node.a"]) == {"n": 1, "taken": ["b"]}


async def _claim(context: DistributedContext, node: str) -> tuple[ClaimStatus, Any]:
    claim = await context.claim(node, 0, OWNER, lease_seconds=30)
    return claim.status, _without_expiry(claim.data)


async def _commit(context: DistributedContext, node: str, operations: list[PatchOperation],
                  claims: list[tuple[str, int]]) -> Any:
    return _without_expiry(await context.commit(node, 0, OWNER, operations, claims))


async def _apply(context: DistributedContext, operations: list[PatchOperation]) -> Any:
    return _without_expiry(await context.apply(operations))


async def _release(context: DistributedContext, node: str) -> Any:
    await context.release(node, OWNER, attempts=0)
    return _without_expiry(await context.load())


async def _load(context: DistributedContext) -> Any:
    return _without_expiry(await context.load())


# -- configuration -----------------------------------------------------------------------------


def test_flags_and_environment_name_the_bucket_and_the_container(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcraft.cli import build_parser
    from flowcraft.cli.common import settings

    for variable in ("FLOWCRAFT_PAYLOAD_BUCKET", "FLOWCRAFT_PAYLOAD_CONTAINER"):
        monkeypatch.delenv(variable, raising=False)
    parse = build_parser().parse_args
    assert settings(parse(["provision", "aws"])).payload_bucket is None  # off by default
    assert settings(parse(["provision", "azure"])).payload_container is None
    assert settings(parse(["provision", "aws", "--payload-bucket", "b1"])).payload_bucket == "b1"
    monkeypatch.setenv("FLOWCRAFT_PAYLOAD_BUCKET", "b2")
    monkeypatch.setenv("FLOWCRAFT_PAYLOAD_CONTAINER", "c2")
    assert settings(parse(["status", "aws", "run-1"])).payload_bucket == "b2"
    assert settings(parse(["status", "azure", "run-1"])).payload_container == "c2"
    assert settings(parse(["status", "azure", "run-1", "--payload-container", "c3"])
                    ).payload_container == "c3"
