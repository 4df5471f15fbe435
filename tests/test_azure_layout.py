"""The layout of a run's context item in Cosmos DB, on the real local services.

Context keys sit at the item's top level (``{id, runId, <key>: <value>...}``, as the
TypeScript library writes them); keys that collide with the item's own properties are stored
escaped and read back as they were; runs stored by earlier versions (the keys nested in a
``context`` object) are read as they are and moved to the top level by their first write. The
local Cosmos server is patched at install time to refuse patches of Cosmos DB's system
properties only, as Cosmos DB does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from azure_helpers import containers, context_of, items_with_id, workers
from distributed_helpers import Executions
from flowcraft import Flow, PatchOperation
from flowcraft.adapters.azure._cosmos import (
    COLLIDING,
    ITEM_PROPERTIES,
    context_key,
    context_pointer,
    stored_name,
)
from flowcraft.core.routing import RECORD_PREFIX
from flowcraft.distributed.context import ClaimStatus, attempts_key, lock_key

SYSTEM = ("_rid", "_self", "_etag", "_attachments", "_ts")


def without_system(item: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in SYSTEM}


async def raw_item(azure: Any, run_id: str) -> dict[str, Any]:
    [item] = await items_with_id(containers(azure)[0], run_id)
    return without_system(item)


async def store_nested(azure: Any, run_id: str, data: dict[str, Any]) -> None:
    """An item as earlier versions wrote it: the keys in a ``context`` object."""
    await containers(azure)[0].create_item({"id": run_id, "runId": run_id, "context": data})


# -- the patched local server ------------------------------------------------------------------


async def test_local_server_patches_underscore_paths(azure: Any) -> None:
    run_id = str(uuid.uuid4())
    container = containers(azure)[0]
    await container.create_item({"id": run_id, "runId": run_id})
    item = await container.patch_item(run_id, partition_key=run_id, patch_operations=[
        {"op": "set", "path": "/_outputs.x", "value": 1},
        {"op": "incr", "path": "/_attempts", "value": 2},
        {"op": "set", "path": "/_etagged", "value": "not a system property"}])
    assert item["_outputs.x"] == 1 and item["_attempts"] == 2
    item = await container.patch_item(run_id, partition_key=run_id, patch_operations=[
        {"op": "remove", "path": "/_outputs.x"},
        {"op": "move", "from": "/_attempts", "path": "/_moved"}])
    assert without_system(item) == {"id": run_id, "runId": run_id, "_moved": 2,
                                    "_etagged": "not a system property"}


@pytest.mark.parametrize("name", SYSTEM)
async def test_local_server_refuses_patches_of_system_properties(azure: Any, name: str) -> None:
    from azure.cosmos.exceptions import CosmosHttpResponseError

    run_id = str(uuid.uuid4())
    container = containers(azure)[0]
    before = await container.create_item({"id": run_id, "runId": run_id, "keep": 1})
    for operations in ([{"op": "set", "path": f"/{name}", "value": "x"}],
                       [{"op": "set", "path": f"/{name}/inner", "value": "x"}],
                       [{"op": "move", "from": f"/{name}", "path": "/stolen"}]):
        with pytest.raises(CosmosHttpResponseError) as error:
            await container.patch_item(run_id, partition_key=run_id,
                                       patch_operations=operations)
        assert error.value.status_code == 400
        assert f"system property {name}" in str(error.value)
    after = await container.read_item(run_id, partition_key=run_id)
    assert after["_etag"] == before["_etag"] and after["keep"] == 1


# -- the top-level layout ----------------------------------------------------------------------


async def test_every_operation_keeps_the_keys_at_the_top_level(azure: Any) -> None:
    run_id = str(uuid.uuid4())
    context = context_of(azure, run_id)
    await context.create({"tenant": "t1", "_outputs.start": {"n": 1}})
    assert await raw_item(azure, run_id) == {
        "id": run_id, "runId": run_id, "tenant": "t1", "_outputs.start": {"n": 1}}

    claim = await context.claim("a", 0, "w1", 60)
    assert claim.status is ClaimStatus.CLAIMED
    item = await raw_item(azure, run_id)
    assert item[lock_key("a")]["owner"] == "w1" and item[attempts_key("a")] == 1
    assert "context" not in item

    assert await context.renew("a", "w1", 120) is True
    assert (await raw_item(azure, run_id))[lock_key("a")]["expires"] > time.time() + 100
    assert await context.renew("a", "someone-else", 120) is False

    data = await context.commit("a", 0, "w1", [
        PatchOperation("set", "_outputs.a", "out"), PatchOperation("set", RECORD_PREFIX + "a",
                                                                   {"n": 1})])
    assert data is not None and data["_outputs.a"] == "out"
    item = await raw_item(azure, run_id)
    assert item["_outputs.a"] == "out" and item[RECORD_PREFIX + "a"] == {"n": 1}
    assert lock_key("a") not in item and attempts_key("a") not in item

    assert (await context.claim("b", 0, "w2", 60)).status is ClaimStatus.CLAIMED
    await context.release("b", "w2", attempts=3)
    item = await raw_item(azure, run_id)
    assert lock_key("b") not in item and item[attempts_key("b")] == 3

    await context.apply([PatchOperation("set", "a/b~c", 1), PatchOperation("delete", "tenant")])
    # Over ten operations: the _etag path writes the same layout.
    await context.apply([PatchOperation("set", f"k{i}", i) for i in range(12)])
    item = await raw_item(azure, run_id)
    assert item["a/b~c"] == 1 and "tenant" not in item and item["k11"] == 11
    assert set(item) == {"id", "runId", "_outputs.start", "_outputs.a", RECORD_PREFIX + "a",
                         attempts_key("b"), "a/b~c", *(f"k{i}" for i in range(12))}
    assert await context_of(azure, run_id).load() == {
        k: v for k, v in item.items() if k not in ("id", "runId")}


async def test_a_completed_run_is_stored_at_the_top_level(azure: Any) -> None:
    runs = Executions()
    flow = (Flow("layout")
            .node("first", runs.node(lambda ctx: {"n": 1}))
            .node("second", runs.node(lambda ctx: ctx.input["n"] + 1))
            .edge("first", "second"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {"id": "mine", "ttl": 5, "user": "ada"})
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert result.context["id"] == "mine" and result.context["ttl"] == 5
    item = await raw_item(azure, run_id)
    assert item["id"] == run_id and item["runId"] == run_id
    assert item["_outputs.first"] == {"n": 1} and item["_outputs.second"] == 2
    assert item["user"] == "ada" and item["~id"] == "mine" and item["~ttl"] == 5
    # The item's own ttl is the finished run's expiry (retention), never the user's key.
    assert item.get("ttl") == worker.retention_seconds and "context" not in item


# -- keys that collide with the item's own properties ----------------------------------------


COLLIDING_KEYS = {"id": "my id", "runId": "my run", "_rid": 1, "_self": [1], "_etag": "e",
                  "_attachments": {"a": 1}, "_ts": 0, "ttl": 10, "context": {"nested": True},
                  "~id": "tilde", "~": "just a tilde", "~~x": 2}


async def test_colliding_keys_are_stored_aside_and_read_back(azure: Any) -> None:
    run_id = str(uuid.uuid4())
    context = context_of(azure, run_id)
    await context.create({"id": "initial", "plain": 1})
    for key, value in COLLIDING_KEYS.items():
        await context.set(key, value)
    assert await context.to_dict() == {"plain": 1, **COLLIDING_KEYS}
    assert await context_of(azure, run_id).load() == {"plain": 1, **COLLIDING_KEYS}
    item = await raw_item(azure, run_id)
    assert item["id"] == run_id and item["runId"] == run_id and "ttl" not in item
    assert item["~id"] == "my id" and item["~context"] == {"nested": True}
    assert item["~~id"] == "tilde" and item["~~"] == "just a tilde" and item["~~~x"] == 2
    for key in COLLIDING_KEYS:
        assert await context.delete(key) is True
    assert await context.to_dict() == {"plain": 1}
    assert without_system(await raw_item(azure, run_id)) == {
        "id": run_id, "runId": run_id, "plain": 1}


async def test_a_key_named_context_is_not_taken_for_the_nested_layout(azure: Any) -> None:
    """Stored as ``~context``, it leaves the item in the top-level layout: claims stay
    one conditional patch each, and the second one sees the first's lease."""
    run_id = str(uuid.uuid4())
    context = context_of(azure, run_id)
    await context.create({"context": "a key named context"})
    assert (await context.claim("n", 0, "w1", 60)).status is ClaimStatus.CLAIMED
    other = await context_of(azure, run_id).claim("n", 0, "w2", 60)
    assert other.status is ClaimStatus.LOCKED and other.holder == "w1"
    assert (await context.load() or {})["context"] == "a key named context"


async def test_an_item_with_unescaped_colliding_keys_from_another_client(azure: Any) -> None:
    """Another client (the TypeScript library) writes every key as it is: its ``context``
    object is a key, not the nested layout, and its first write by a worker escapes it. A
    top-level ``ttl`` is what Cosmos DB makes of it, the item's expiry: not a context key,
    left as it is; a context key named ``ttl`` is stored as ``~ttl``."""
    run_id = str(uuid.uuid4())
    await containers(azure)[0].create_item({"id": run_id, "runId": run_id, "user": "ada",
                                            "context": {"a": 1}, "ttl": 500})
    expected = {"user": "ada", "context": {"a": 1}}
    assert await context_of(azure, run_id).load() == expected
    assert (await context_of(azure, run_id).claim("n", 0, "w1", 60)).status \
        is ClaimStatus.CLAIMED
    assert await context_of(azure, run_id).renew("n", "w1", 60) is True
    data = await context_of(azure, run_id).commit("n", 0, "w1", [
        PatchOperation("set", "ttl", 6)])
    assert data == {**expected, "ttl": 6}
    item = await raw_item(azure, run_id)
    assert "context" not in item and item["ttl"] == 500
    assert item["~context"] == {"a": 1} and item["~ttl"] == 6
    assert await context_of(azure, run_id).load() == {**expected, "ttl": 6}


@given(st.text(max_size=12))
def test_stored_names_are_reversible_and_never_collide(key: str) -> None:
    name = stored_name(key)
    assert context_key(name) == key
    assert name not in COLLIDING
    assert (name == key) == (key not in COLLIDING and not key.startswith("~"))
    assert ITEM_PROPERTIES <= COLLIDING
    assert context_pointer(key) == "/" + name.replace("~", "~0").replace("/", "~1")


# -- runs stored in the nested layout ------------------------------------------------------------


async def test_a_nested_run_is_loaded_and_its_first_write_moves_it_to_the_top_level(
        azure: Any) -> None:
    run_id = str(uuid.uuid4())
    await store_nested(azure, run_id, {"tenant": "t1", "_outputs.a": [1], "id": "kept"})
    context = context_of(azure, run_id)
    assert await context.load() == {"tenant": "t1", "_outputs.a": [1], "id": "kept"}
    assert (await raw_item(azure, run_id))["context"]["tenant"] == "t1"  # reading moves nothing

    await context.apply([PatchOperation("set", "more", 2)])
    assert await raw_item(azure, run_id) == {
        "id": run_id, "runId": run_id, "tenant": "t1", "_outputs.a": [1], "~id": "kept",
        "more": 2}
    assert await context_of(azure, run_id).load() == {
        "tenant": "t1", "_outputs.a": [1], "id": "kept", "more": 2}


async def test_a_nested_run_is_claimed_committed_and_moved(azure: Any) -> None:
    run_id = str(uuid.uuid4())
    await store_nested(azure, run_id, {"tenant": "t1", attempts_key("a"): 1})
    context = context_of(azure, run_id)
    claim = await context.claim("a", 0, "w1", 60)
    assert claim.status is ClaimStatus.CLAIMED and claim.data is not None
    assert claim.data[attempts_key("a")] == 2  # the attempt counted from the nested value
    item = await raw_item(azure, run_id)
    assert "context" not in item and item[lock_key("a")]["owner"] == "w1"
    assert await context.renew("a", "w1", 60) is True
    data = await context.commit("a", 0, "w1", [PatchOperation("set", "_outputs.a", "done")])
    assert data == {"tenant": "t1", "_outputs.a": "done"}


async def test_a_nested_run_leased_by_another_owner_is_refused_and_left_alone(
        azure: Any) -> None:
    run_id = str(uuid.uuid4())
    lease = {"owner": "other", "n": 0, "expires": time.time() + 60}
    await store_nested(azure, run_id, {lock_key("a"): lease})
    before = await raw_item(azure, run_id)
    claim = await context_of(azure, run_id).claim("a", 0, "w1", 60)
    assert claim.status is ClaimStatus.LOCKED and claim.holder == "other"
    assert await context_of(azure, run_id).commit("a", 0, "w1", [
        PatchOperation("set", "stolen", 1)]) is None
    assert await context_of(azure, run_id).renew("a", "w1", 60) is False
    assert await raw_item(azure, run_id) == before  # still nested, unchanged


async def test_concurrent_claims_of_a_nested_run_have_one_winner(azure: Any) -> None:
    for _ in range(3):
        run_id = str(uuid.uuid4())
        await store_nested(azure, run_id, {"tenant": "t1"})
        claims = await asyncio.gather(*(context_of(azure, run_id).claim("a", 0, f"w{i}", 60)
                                        for i in range(4)))
        winners = [c for c in claims if c.status is ClaimStatus.CLAIMED]
        assert len(winners) == 1, [c.status for c in claims]
        item = await raw_item(azure, run_id)
        assert "context" not in item and item["tenant"] == "t1"
        assert item[lock_key("a")]["owner"] == winners[0].holder
        assert item[attempts_key("a")] == 1


async def test_a_parked_run_stored_nested_is_resumed_to_completion(azure: Any) -> None:
    """A run an earlier version parked on a wait node, resumed by this one."""
    runs = Executions()
    flow = (Flow("approval")
            .node("request", runs.node(lambda ctx: {"amount": 120}))
            .wait("approve")
            .node("pay", runs.node(lambda ctx: {"paid": ctx.input}))
            .edge("request", "approve")
            .edge("approve", "pay", action="approved"))
    bp = flow.to_blueprint()
    async with workers(azure, [bp], flow.registry()) as (worker,):
        run_id = await worker.start_workflow(bp, {"tenant": "t1"})
        assert (await worker.wait_for_result(run_id, timeout=20)).status == "awaiting"
        # Rewrite the item as an earlier version stored it.
        container = containers(azure)[0]
        current = await container.read_item(run_id, partition_key=run_id)
        data = {k: v for k, v in without_system(current).items() if k not in ("id", "runId")}
        await container.replace_item(run_id, {"id": run_id, "runId": run_id, "context": data})
        assert (await worker.wait_for_result(run_id, timeout=1)).status == "awaiting"
        assert await worker.resume_with_action(run_id, "approved", {"by": "ada"}) == ["approve"]
        result = await worker.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.pay"] == {"paid": {"by": "ada"}}
    assert result.context["tenant"] == "t1" and runs.counts == {"request": 1, "pay": 1}
    item = await raw_item(azure, run_id)
    assert "context" not in item and item["_outputs.pay"] == {"paid": {"by": "ada"}}


# -- the check that the local server is the patched one ------------------------------------------


def test_an_unpatched_local_server_is_refused_saying_what_to_run(tmp_path: Any) -> None:
    from flowcraft.local import (
        COSMOS_PATCH_MARK,
        check_cosmos_patched,
        node_binary,
        node_tools_dir,
    )

    script = (node_tools_dir() / "patch-cosmosdb-server.js").read_text(encoding="utf-8")
    assert f'"/* {COSMOS_PATCH_MARK} */"' in script  # the mark the script writes
    check_cosmos_patched(node_binary("cosmosdb-server"))  # the installed one is patched

    lib = tmp_path / "lib"
    (lib / "handler").mkdir(parents=True)
    (lib / "cli.js").write_text("")
    (lib / "handler" / "_patch-operations.js").write_text('if (path.startsWith("/_")) {}')
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "cosmosdb-server").symlink_to(lib / "cli.js")
    with pytest.raises(RuntimeError, match=r"not patched.*run scripts/setup"):
        check_cosmos_patched(str(tmp_path / "bin" / "cosmosdb-server"))
