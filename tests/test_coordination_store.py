"""The coordination store contract: what every coordination store must do, and the engine's
narrow use of it (``get`` and ``set_if_not_exist`` only: the other operations form
``FullCoordinationStore``, which the provided stores offer to applications).

A new backend must pass this suite: add its store to the ``store`` fixture's parameters.

The suite runs on :class:`~flowcraft.distributed.coordination.InMemoryCoordinationStore`,
``DynamoDbCoordinationStore`` (a moto server, on a table of the AWS guide's schema) and
``RedisCoordinationStore`` (redis-server). It covers the operations they share: ``get``,
``set_if_not_exist`` (one winner under concurrency), ``increment`` (atomic), ``delete``,
``extend_ttl``, the idempotent join sets (``join_add``, ``join_members``), and expiry after a
one-second TTL (a TTL of 0 never expires). What only one store does (DynamoDB's item layout
and lazily swept items, Redis's real TTLs and round-trip counts) is tested beside its adapter.

Every test uses fresh keys (under ``flowcraft:test:<uuid>:``), so shared servers are fine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aws_helpers import make_moto_dynamodb_atomic
from flowcraft import Flow, FlowRuntime
from flowcraft.distributed import InProcessAdapter
from flowcraft.distributed.coordination import (
    KEY_PREFIX,
    CoordinationStore,
    FullCoordinationStore,
    InMemoryCoordinationStore,
    cancel_key,
    poison_key,
)

TTL = 60
TTL_WAIT_SECONDS = 1.3
"""How long after a 1-second TTL a key must read as absent (DynamoDB's expiry is in whole
seconds)."""
DYNAMODB_TABLE = "contract-coordination"
Key = Callable[[str], str]
_SESSION: Any = None


async def _dynamodb_store(moto: Any) -> AsyncIterator[Any]:
    """A store on a coordination table of the AWS guide's schema (key ``key``, TTL on
    ``ttl``), made once and shared by these tests (every test uses fresh keys)."""
    global _SESSION
    from aiobotocore.session import get_session

    from flowcraft.adapters.aws import DynamoDbCoordinationStore

    _SESSION = _SESSION or get_session()  # one session: the service models load once
    async with _SESSION.create_client(
        "dynamodb", region_name="us-east-1", endpoint_url=moto.url,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    ) as client:
        try:
            await client.describe_table(TableName=DYNAMODB_TABLE)
        except client.exceptions.ResourceNotFoundException:
            await client.create_table(
                TableName=DYNAMODB_TABLE,
                AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}],
                KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
                BillingMode="PAY_PER_REQUEST")
            await client.update_time_to_live(
                TableName=DYNAMODB_TABLE,
                TimeToLiveSpecification={"Enabled": True, "AttributeName": "ttl"})
        yield DynamoDbCoordinationStore(client=client, table_name=DYNAMODB_TABLE)


async def _redis_store(redis_url: str) -> AsyncIterator[Any]:
    import redis.asyncio as redis_asyncio

    from flowcraft.adapters.azure import RedisCoordinationStore

    client = redis_asyncio.from_url(redis_url)
    try:
        yield RedisCoordinationStore(client)
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "dynamodb", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield InMemoryCoordinationStore()
        return
    if request.param == "dynamodb":
        # moto applies concurrent updates of one item non-atomically (see aws_helpers).
        make_moto_dynamodb_atomic(request.getfixturevalue("monkeypatch"))
        stores = _dynamodb_store(request.getfixturevalue("moto"))
    else:
        services = request.getfixturevalue("azure_services_session")
        stores = _redis_store(services.endpoints.redis_url)
    async for made in stores:
        yield made


@pytest.fixture
def key() -> Key:
    prefix = f"{KEY_PREFIX}test:{uuid.uuid4().hex}:"
    return lambda name: prefix + name


# -- protocol ------------------------------------------------------------------------------


async def test_satisfies_the_protocols(store: Any) -> None:
    assert isinstance(store, FullCoordinationStore)
    assert isinstance(store, CoordinationStore)


async def test_missing_key_reads_as_none(store: Any, key: Key) -> None:
    assert await store.get(key("missing")) is None


# -- set_if_not_exist ----------------------------------------------------------------------


async def test_set_if_not_exist_sets_once(store: Any, key: Key) -> None:
    assert await store.set_if_not_exist(key("k"), "first", TTL) is True
    assert await store.set_if_not_exist(key("k"), "second", TTL) is False
    assert await store.get(key("k")) == "first"
    assert await store.set_if_not_exist(key("other"), "second", TTL) is True


async def test_set_if_not_exist_has_one_winner_under_concurrency(store: Any, key: Key) -> None:
    results = await asyncio.gather(
        *(store.set_if_not_exist(key("race"), f"w{i}", TTL) for i in range(20)))
    assert results.count(True) == 1
    winner = results.index(True)
    assert await store.get(key("race")) == f"w{winner}"


# -- increment -----------------------------------------------------------------------------


async def test_increment_counts_from_one(store: Any, key: Key) -> None:
    assert [await store.increment(key("c"), TTL) for _ in range(3)] == [1, 2, 3]
    assert await store.increment(key("other"), TTL) == 1
    assert await store.get(key("c")) == "3"


async def test_increment_is_atomic(store: Any, key: Key) -> None:
    results = await asyncio.gather(*(store.increment(key("n"), TTL) for _ in range(50)))
    assert sorted(results) == list(range(1, 51))


# -- delete --------------------------------------------------------------------------------


async def test_delete(store: Any, key: Key) -> None:
    await store.set_if_not_exist(key("d"), "v", TTL)
    await store.delete(key("d"))
    assert await store.get(key("d")) is None
    assert await store.set_if_not_exist(key("d"), "again", TTL) is True
    await store.delete(key("never-set"))  # no error


async def test_delete_resets_a_counter(store: Any, key: Key) -> None:
    await store.increment(key("c"), TTL)
    await store.increment(key("c"), TTL)
    await store.delete(key("c"))
    assert await store.get(key("c")) is None
    assert await store.increment(key("c"), TTL) == 1


# -- TTL -----------------------------------------------------------------------------------


async def test_keys_expire_after_their_ttl(store: Any, key: Key) -> None:
    await store.set_if_not_exist(key("short"), "v", 1)
    await store.increment(key("count"), 1)
    await store.join_add(key("join"), "a", 1)
    await store.set_if_not_exist(key("long"), "v", TTL)
    # A TTL of 0: no expiry.
    await store.set_if_not_exist(key("forever"), "v", 0)
    await store.increment(key("forever-count"), 0)
    await store.join_add(key("forever-join"), "a", 0)
    await asyncio.sleep(TTL_WAIT_SECONDS)
    assert await store.get(key("short")) is None
    assert await store.set_if_not_exist(key("short"), "new", TTL) is True
    assert await store.get(key("short")) == "new"
    assert await store.increment(key("count"), TTL) == 1
    assert await store.join_members(key("join")) == set()
    assert await store.join_add(key("join"), "b", TTL) == 1
    assert await store.get(key("long")) == "v"
    assert await store.get(key("forever")) == "v"
    assert await store.increment(key("forever-count"), 0) == 2
    assert await store.join_members(key("forever-join")) == {"a"}


async def test_extend_ttl(store: Any, key: Key) -> None:
    assert await store.extend_ttl(key("absent"), TTL) is False
    assert await store.get(key("absent")) is None  # extending does not create
    await store.set_if_not_exist(key("k"), "v", 1)
    assert await store.extend_ttl(key("k"), TTL) is True
    await asyncio.sleep(TTL_WAIT_SECONDS)
    assert await store.get(key("k")) == "v"  # outlived its first TTL


async def test_extend_ttl_of_an_expired_key_is_false(store: Any, key: Key) -> None:
    await store.set_if_not_exist(key("k"), "v", 1)
    await asyncio.sleep(TTL_WAIT_SECONDS)
    assert await store.extend_ttl(key("k"), TTL) is False
    assert await store.get(key("k")) is None


# -- join_add / join_members ---------------------------------------------------------------


async def test_join_add_counts_members_once(store: Any, key: Key) -> None:
    assert await store.join_members(key("j")) == set()
    assert await store.join_add(key("j"), "a", TTL) == 1
    assert await store.join_add(key("j"), "a", TTL) == 1  # a redelivered job
    assert await store.join_add(key("j"), "b", TTL) == 2
    assert await store.join_add(key("j"), "a", TTL) == 2
    assert await store.join_members(key("j")) == {"a", "b"}
    assert await store.join_add(key("other"), "a", TTL) == 1


async def test_join_add_is_idempotent_under_concurrency(store: Any, key: Key) -> None:
    members = [f"m{i % 5}" for i in range(40)]  # each of 5 members added 8 times
    counts = await asyncio.gather(*(store.join_add(key("j"), m, TTL) for m in members))
    assert max(counts) == 5
    assert all(1 <= c <= 5 for c in counts)
    assert await store.join_members(key("j")) == {f"m{i}" for i in range(5)}


async def test_delete_resets_a_join(store: Any, key: Key) -> None:
    await store.join_add(key("j"), "a", TTL)
    await store.delete(key("j"))
    assert await store.join_members(key("j")) == set()
    assert await store.join_add(key("j"), "b", TTL) == 1


# -- the in-memory store's own ---------------------------------------------------------------


async def test_in_memory_store_counts_calls(key: Key) -> None:
    store = InMemoryCoordinationStore()
    await store.get(key("a"))
    await store.set_if_not_exist(key("a"), "v", TTL)
    assert store.calls == 2


class FirstWriterWinsStore:
    """A store with only what the engine calls: a custom store may be this small."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    async def get(self, key: str) -> str | None:
        return self.values.get(key)

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: int) -> bool:
        if key in self.values:
            return False
        self.values[key] = value
        return True


async def test_the_engine_needs_only_get_and_set_if_not_exist() -> None:
    # An ``any`` join (first arrival) and a failed node (markers for its successors) are
    # everything a run asks of the coordination store.
    store = FirstWriterWinsStore()
    assert isinstance(store, CoordinationStore)
    assert not isinstance(store, FullCoordinationStore)

    def fail(ctx: Any) -> None:
        raise ValueError("card declined")

    flow = (Flow("coordinated")
            .node("start", lambda ctx: 1)
            .node("left", lambda ctx: "left").node("right", lambda ctx: "right")
            .node("first", lambda ctx: ctx.input, join_strategy="any")
            .node("charge", fail).node("after", lambda ctx: None)
            .edge("start", "left").edge("start", "right")
            .edge("left", "first").edge("right", "first")
            .edge("first", "charge").edge("charge", "after"))
    runtime = FlowRuntime(blueprints={"coordinated": flow.to_blueprint()},
                          registry=flow.registry())
    adapter = InProcessAdapter(runtime.options, store, poll_wait_seconds=0.05)
    await adapter.start()
    try:
        run_id = await adapter.start_workflow("coordinated", {})
        result = await adapter.wait_for_result(run_id, timeout=10, poll_interval=0.02)
    finally:
        await adapter.stop(timeout_seconds=5)
    assert result.status == "failed"
    assert [error.node_id for error in result.errors] == ["charge"]
    assert result.context["_outputs.first"] in ("left", "right")
    assert store.values[f"{KEY_PREFIX}any:{run_id}:first:0"] in ("left", "right")
    assert store.values[poison_key(run_id, "after")] == "charge"


def test_marker_keys_are_namespaced() -> None:
    assert poison_key("run-1", "node-a") == "flowcraft:poison:run-1:node-a"
    assert cancel_key("run-1", "node-a") == "flowcraft:cancel:run-1:node-a"
    assert KEY_PREFIX == "flowcraft:"
