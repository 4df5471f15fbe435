"""The coordination stores' contract, written once for every store, and the engine's narrow
use of it (``get`` and ``set_if_not_exist`` only).

``CoordinationStoreContract`` holds the tests; a store's test class inherits it and provides
a ``store`` fixture. The Redis and DynamoDB stores reuse it like this::

    from test_coordination_store import CoordinationStoreContract

    class TestRedisCoordinationStore(CoordinationStoreContract):
        ttl_wait_seconds = 2.5          # how long after a 1 s TTL a key must be gone

        @pytest.fixture
        async def store(self, redis_client):
            yield RedisCoordinationStore(redis_client)

Every test uses fresh keys (under ``flowcraft:test:<uuid>:``), so a shared server is fine.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

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


class CoordinationStoreContract:
    """Tests every provided store (a ``FullCoordinationStore``) must pass. Subclasses provide a
    ``store`` fixture."""

    ttl_wait_seconds: float = 1.3
    """How long to wait after a 1-second TTL before the key must read as absent."""

    @pytest.fixture
    def key(self) -> Any:
        prefix = f"{KEY_PREFIX}test:{uuid.uuid4().hex}:"
        return lambda name: prefix + name

    # -- protocol ----------------------------------------------------------------------------

    async def test_satisfies_the_protocols(self, store: FullCoordinationStore) -> None:
        assert isinstance(store, FullCoordinationStore)
        assert isinstance(store, CoordinationStore)

    async def test_missing_key_reads_as_none(self, store: FullCoordinationStore, key: Any) -> None:
        assert await store.get(key("missing")) is None

    # -- set_if_not_exist --------------------------------------------------------------------

    async def test_set_if_not_exist_sets_once(self, store: FullCoordinationStore, key: Any) -> None:
        assert await store.set_if_not_exist(key("k"), "first", TTL) is True
        assert await store.set_if_not_exist(key("k"), "second", TTL) is False
        assert await store.get(key("k")) == "first"

    async def test_set_if_not_exist_has_one_winner_under_concurrency(
        self, store: FullCoordinationStore, key: Any
    ) -> None:
        results = await asyncio.gather(
            *(store.set_if_not_exist(key("race"), f"w{i}", TTL) for i in range(20)))
        assert results.count(True) == 1
        winner = results.index(True)
        assert await store.get(key("race")) == f"w{winner}"

    # -- increment ---------------------------------------------------------------------------

    async def test_increment_counts_from_one(self, store: FullCoordinationStore, key: Any) -> None:
        assert [await store.increment(key("c"), TTL) for _ in range(3)] == [1, 2, 3]
        assert await store.increment(key("other"), TTL) == 1
        assert await store.get(key("c")) == "3"

    async def test_increment_is_atomic(self, store: FullCoordinationStore, key: Any) -> None:
        results = await asyncio.gather(*(store.increment(key("n"), TTL) for _ in range(50)))
        assert sorted(results) == list(range(1, 51))

    # -- delete ------------------------------------------------------------------------------

    async def test_delete(self, store: FullCoordinationStore, key: Any) -> None:
        await store.set_if_not_exist(key("d"), "v", TTL)
        await store.delete(key("d"))
        assert await store.get(key("d")) is None
        assert await store.set_if_not_exist(key("d"), "again", TTL) is True
        await store.delete(key("never-set"))  # no error

    async def test_delete_resets_a_counter(self, store: FullCoordinationStore, key: Any) -> None:
        await store.increment(key("c"), TTL)
        await store.increment(key("c"), TTL)
        await store.delete(key("c"))
        assert await store.increment(key("c"), TTL) == 1

    # -- TTL ---------------------------------------------------------------------------------

    async def test_keys_expire_after_their_ttl(self, store: FullCoordinationStore,
                                               key: Any) -> None:
        await store.set_if_not_exist(key("short"), "v", 1)
        await store.increment(key("count"), 1)
        await store.join_add(key("join"), "a", 1)
        await store.set_if_not_exist(key("long"), "v", TTL)
        await asyncio.sleep(self.ttl_wait_seconds)
        assert await store.get(key("short")) is None
        assert await store.set_if_not_exist(key("short"), "new", TTL) is True
        assert await store.get(key("short")) == "new"
        assert await store.increment(key("count"), TTL) == 1
        assert await store.join_members(key("join")) == set()
        assert await store.join_add(key("join"), "b", TTL) == 1
        assert await store.get(key("long")) == "v"

    async def test_extend_ttl(self, store: FullCoordinationStore, key: Any) -> None:
        assert await store.extend_ttl(key("absent"), TTL) is False
        assert await store.get(key("absent")) is None  # extending does not create
        await store.set_if_not_exist(key("k"), "v", 1)
        assert await store.extend_ttl(key("k"), TTL) is True
        await asyncio.sleep(self.ttl_wait_seconds)
        assert await store.get(key("k")) == "v"  # outlived its first TTL

    async def test_extend_ttl_of_an_expired_key_is_false(self, store: FullCoordinationStore,
                                                         key: Any) -> None:
        await store.set_if_not_exist(key("k"), "v", 1)
        await asyncio.sleep(self.ttl_wait_seconds)
        assert await store.extend_ttl(key("k"), TTL) is False
        assert await store.get(key("k")) is None

    # -- join_add ----------------------------------------------------------------------------

    async def test_join_add_counts_members_once(self, store: FullCoordinationStore,
                                                key: Any) -> None:
        assert await store.join_members(key("j")) == set()
        assert await store.join_add(key("j"), "a", TTL) == 1
        assert await store.join_add(key("j"), "a", TTL) == 1  # a redelivered job
        assert await store.join_add(key("j"), "b", TTL) == 2
        assert await store.join_add(key("j"), "a", TTL) == 2
        assert await store.join_members(key("j")) == {"a", "b"}
        assert await store.join_add(key("other"), "a", TTL) == 1

    async def test_join_add_is_idempotent_under_concurrency(self, store: FullCoordinationStore,
                                                            key: Any) -> None:
        members = [f"m{i % 5}" for i in range(40)]  # each of 5 members added 8 times
        counts = await asyncio.gather(*(store.join_add(key("j"), m, TTL) for m in members))
        assert max(counts) == 5
        assert all(1 <= c <= 5 for c in counts)
        assert await store.join_members(key("j")) == {f"m{i}" for i in range(5)}

    async def test_delete_resets_a_join(self, store: FullCoordinationStore, key: Any) -> None:
        await store.join_add(key("j"), "a", TTL)
        await store.delete(key("j"))
        assert await store.join_members(key("j")) == set()
        assert await store.join_add(key("j"), "b", TTL) == 1


class TestInMemoryCoordinationStore(CoordinationStoreContract):
    @pytest.fixture
    async def store(self) -> AsyncIterator[InMemoryCoordinationStore]:
        yield InMemoryCoordinationStore()

    async def test_counts_calls(self, store: InMemoryCoordinationStore, key: Any) -> None:
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
