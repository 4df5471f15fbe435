"""Every context implements ``AsyncContext`` the same way: ``AsyncContextBase``'s methods over
``load()`` and ``apply()``. One set of checks for the in-memory context, a node's tracked
view and the in-memory stored context (the DynamoDB and Cosmos DB contexts run the same
methods against their services in their adapters' tests)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from flowcraft.context import (
    AsyncContext,
    AsyncContextBase,
    InMemoryContext,
    PatchOperation,
    TrackedContext,
)
from flowcraft.distributed.context import InMemoryRunStore


async def in_memory(initial: dict[str, Any]) -> AsyncContextBase:
    return InMemoryContext(initial)


async def tracked(initial: dict[str, Any]) -> AsyncContextBase:
    return TrackedContext(dict(initial))


async def stored(initial: dict[str, Any]) -> AsyncContextBase:
    context = InMemoryRunStore().context("run")
    await context.create(initial)
    return context


MAKERS: dict[str, Callable[[dict[str, Any]], Awaitable[AsyncContextBase]]] = {
    "in-memory": in_memory, "tracked": tracked, "stored": stored}


@pytest.fixture(params=list(MAKERS))
def make(request: pytest.FixtureRequest) -> Callable[[dict[str, Any]], Awaitable[Any]]:
    return MAKERS[str(request.param)]


async def test_every_context_reads_and_writes_alike(make: Any) -> None:
    context = await make({"a": 1, "gone": True})
    assert isinstance(context, AsyncContext)
    assert await context.get("a") == 1
    assert await context.get("missing") is None
    assert await context.get("missing", "fallback") == "fallback"
    await context.set("b", {"x": [1, 2]})
    assert await context.has("b") and not await context.has("missing")
    assert await context.delete("gone") is True
    assert await context.delete("gone") is False
    await context.patch([PatchOperation.set("c", 3), PatchOperation.delete("a"),
                         PatchOperation.set("c", 4)])
    assert await context.to_dict() == {"b": {"x": [1, 2]}, "c": 4}


async def test_to_dict_is_a_copy(make: Any) -> None:
    context = await make({"a": 1})
    (await context.to_dict())["a"] = 2
    assert await context.get("a") == 1


async def test_a_stored_context_not_created_yet_reads_empty() -> None:
    context = InMemoryRunStore().context("never")
    assert await context.load() is None
    assert await context.get("a", "fallback") == "fallback"
    assert not await context.has("a")
    assert await context.to_dict() == {}
    assert await context.delete("a") is False


async def test_a_nodes_view_records_every_write_including_a_delete_of_nothing() -> None:
    context = TrackedContext({"a": 1})
    await context.set("b", 2)
    assert await context.delete("missing") is False
    await context.patch([PatchOperation.delete("a")])
    assert context.deltas == [PatchOperation.set("b", 2), PatchOperation.delete("missing"),
                              PatchOperation.delete("a")]
    assert context.data == {"b": 2}


def test_a_context_without_its_primitives_cannot_be_made() -> None:
    class Incomplete(AsyncContextBase):
        async def load(self) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match="apply"):
        Incomplete()  # type: ignore[abstract]
