"""``flowcraft.client``: every method on both clouds against the local services (moto;
Azurite + the Cosmos server + redis), plus the pure parts (node states, cursors)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import aws_helpers
import azure_helpers
from distributed_helpers import Executions
from flowcraft import Flow, NodeContext, RunAlreadyExistsError, runview
from flowcraft.client import (
    Client,
    RunNotFoundError,
    decode_cursor,
    encode_cursor,
    node_states,
)
from flowcraft.errors import FlowcraftError

CLOUDS = ["aws", "azure"]


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    aws_helpers.make_moto_dynamodb_atomic(monkeypatch)


@pytest.fixture(params=CLOUDS)
def cloud(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def services(cloud: str, request: pytest.FixtureRequest) -> Any:
    """The ``aws`` or ``azure`` fixture, as the test's cloud asks."""
    return request.getfixturevalue(cloud)


def client_for(cloud: str, services: Any, blueprints: Any) -> Client:
    if cloud == "aws":
        return Client.from_aws(services.sqs, services.dynamodb, services.queue_url,
                               blueprints=blueprints, context_table=services.context_table,
                               status_table=services.status_table,
                               coordination_table=services.coordination_table)
    return Client.from_azure(services.queue, services.cosmos, services.redis,
                             blueprints=blueprints, database=services.database,
                             context_container=services.context_container,
                             status_container=services.status_container)


@contextlib.asynccontextmanager
async def workers(cloud: str, services: Any, blueprints: list[Any], registry: Any,
                  **options: Any) -> AsyncIterator[Any]:
    helpers = aws_helpers if cloud == "aws" else azure_helpers
    async with helpers.workers(services, blueprints, registry, **options) as started:
        yield started


def chain() -> tuple[Flow, Executions]:
    runs = Executions()
    flow = (Flow("chain")
            .node("a", runs.node(lambda ctx: 1))
            .node("b", runs.node(lambda ctx: ctx.input + 1))
            .edge("a", "b"))
    return flow, runs


# -- pure parts --------------------------------------------------------------------------------


def test_node_states_from_records_leases_and_awaiting() -> None:
    flow = (Flow("states").node("a", lambda ctx: 1).node("b", lambda ctx: 1)
            .node("c", lambda ctx: 1).node("d", lambda ctx: 1).node("e", lambda ctx: 1)
            .wait("w"))
    data = {"_flowcraft.node.a": {"n": 1, "taken": []},
            "_flowcraft.node.b": {"n": 1, "skipped": True},
            "_flowcraft.node.c": {"n": 1, "failed": True},
            "_flowcraft.lock.d": {"owner": "x", "expires": 200.0},
            "_flowcraft.lock.e": {"owner": "x", "expires": 50.0},
            "_awaitingNodeIds": ["w"]}
    assert node_states(flow.to_blueprint(), data, now=100.0) == {
        "a": "done", "b": "skipped", "c": "failed", "d": "running", "e": "pending",
        "w": "awaiting"}


def test_node_states_are_the_run_views_states() -> None:
    # A node added at run time (pending: no record yet), one only an output names, one only
    # the awaiting list names, and a lease whose expiry is not a number (not live).
    flow = Flow("states").node("a", lambda ctx: 1).node("b", lambda ctx: 1)
    data = {"_flowcraft.node.a": {"n": 1, "taken": [0]},
            "_flowcraft.dynamic.a": {"nodes": [{"id": "extra", "uses": "step"}], "edges": []},
            "_outputs.gone": 1,
            "_flowcraft.lock.b": {"owner": "x", "expires": "soon"},
            "_awaitingNodeIds": ["parked"]}
    states = node_states(flow.to_blueprint(), data, now=100.0)
    assert states == {"a": "done", "b": "pending", "extra": "pending", "gone": "pending",
                      "parked": "awaiting"}
    views = runview.node_states(flow.to_blueprint(), data, now=100.0)
    assert states == {node_id: view.state for node_id, view in views.items()}


def test_cursor_round_trip_and_garbage_is_refused() -> None:
    value = {"s": 2, "k": {"runId": {"S": "r"}}}
    assert decode_cursor(encode_cursor(value)) == value
    with pytest.raises(FlowcraftError, match="next_cursor"):
        decode_cursor("not a cursor!")


# -- both clouds -------------------------------------------------------------------------------


async def test_start_status_result_and_errors(cloud: str, services: Any) -> None:
    flow, runs = chain()
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry()), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("chain", {"x": 1}, run_id="run-one")
        assert run_id == "run-one"
        with pytest.raises(RunAlreadyExistsError):
            await client.start("chain", {}, run_id="run-one")
        result = await client.result(run_id, timeout=30)
        assert result.status == "completed" and result.ok
        assert result.context["_outputs.b"] == 2 and result.context["x"] == 1
        assert runs.counts == {"a": 1, "b": 1}
        status = await client.status(run_id)
        assert status.status == "completed" and status.blueprint_id == "chain"
        assert status.nodes == {"a": "done", "b": "done"}
        assert status.progress() == (2, 2)
        assert status.started_at is not None and status.finished_at is not None
        assert status.started_at <= status.finished_at
        with pytest.raises(RunNotFoundError, match="no run 'nope'"):
            await client.status("nope")
        with pytest.raises(RunNotFoundError):
            await client.result("nope", timeout=1)


async def test_failed_run_reports_the_error_type_and_message(cloud: str, services: Any) -> None:
    def boom(ctx: NodeContext) -> Any:
        raise ValueError("bad order")

    flow = Flow("fails").node("a", lambda ctx: 1).node("b", boom).edge("a", "b")
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry()), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("fails")
        result = await client.result(run_id, timeout=30)
        status = await client.status(run_id)
    assert result.status == "failed"
    assert [(e.node_id, e.type, e.message) for e in result.errors] == [
        ("b", "ValueError", "ValueError: bad order")]
    assert status.nodes == {"a": "done", "b": "failed"}
    [error] = status.errors
    assert error.traceback is not None and "in boom" in error.traceback


async def test_result_returns_soon_after_the_run_ends(cloud: str, services: Any) -> None:
    flow, _ = chain()
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry()), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("chain")
        started = time.monotonic()
        await client.result(run_id, timeout=30)
        finished = time.monotonic() - started
        # A run that is done already answers at the first read: no poll interval.
        started = time.monotonic()
        await client.result(run_id, timeout=30)
        again = time.monotonic() - started
    assert again < 0.5, again
    assert finished < 10, finished
    with pytest.raises(TimeoutError, match="did not finish within"):
        async with client_for(cloud, services, [bp]) as idle:
            await idle.start("chain", run_id="never-worked")
            await idle.result("never-worked", timeout=0.3)


async def test_list_runs_filters_and_pages_through_the_index(cloud: str,
                                                             services: Any) -> None:
    flow, _ = chain()
    other = Flow("other").node("z", lambda ctx: 0)
    bps = [flow.to_blueprint(), other.to_blueprint()]
    async with client_for(cloud, services, bps) as client:
        # No worker: every run stays running.
        chains = [await client.start("chain", run_id=f"c{i}") for i in range(5)]
        others = [await client.start("other", run_id=f"o{i}") for i in range(2)]
        page = await client.list_runs(status="running", limit=50)
        assert sorted(r.run_id for r in page.items) == sorted(chains + others)
        assert page.next_cursor is None
        updated = [r.updated_at for r in page.items]
        assert updated == sorted(updated, reverse=True)  # newest first

        seen: list[str] = []
        cursor = None
        for _ in range(10):
            page = await client.list_runs(status="running", blueprint_id="chain", limit=2,
                                          cursor=cursor)
            assert len(page.items) <= 2
            seen += [r.run_id for r in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(seen) == sorted(chains)

        assert (await client.list_runs(status="completed")).items == []
        everything = await client.list_runs()
        assert sorted(r.run_id for r in everything.items) == sorted(chains + others)
        assert (await client.list_runs(since="2999-01-01T00:00:00")).items == []
        with pytest.raises(FlowcraftError, match="unknown status"):
            await client.list_runs(status="done")


async def test_cancel_stops_a_running_node_and_nothing_after_it_runs(
        cloud: str, services: Any) -> None:
    seen: dict[str, Any] = {}
    runs = Executions()

    async def long(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ctx.signal.wait(), 20)
        seen["signalled_after"] = time.monotonic() - started
        seen["signal"] = ctx.signal.is_set()
        return "stopped"

    flow = (Flow("cancel-me").node("a", long).node("b", runs.node(lambda ctx: 1))
            .edge("a", "b"))
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry(), lease_seconds=1.5), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("cancel-me")
        for _ in range(200):
            if (await client.status(run_id)).nodes.get("a") == "running":
                break
            await asyncio.sleep(0.05)
        assert await client.cancel(run_id, reason="changed my mind") is True
        result = await client.result(run_id, timeout=10)
        assert result.status == "cancelled"
        for _ in range(100):
            if "signal" in seen:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # time for anything that would wrongly run next
        status = await client.status(run_id)
        assert await client.cancel(run_id) is False  # final: left as it is
        listed = await client.list_runs(status="cancelled")
    assert seen["signal"] is True and seen["signalled_after"] < 5
    assert runs.counts == {"a": 1}
    assert status.status == "cancelled" and status.reason == "changed my mind"
    assert status.nodes["b"] == "pending"
    assert [r.run_id for r in listed.items] == [run_id]


async def test_resume_and_reconcile(cloud: str, services: Any) -> None:
    runs = Executions()
    flow = (Flow("approval")
            .node("request", runs.node(lambda ctx: 1))
            .wait("approve")
            .node("pay", runs.node(lambda ctx: {"paid": ctx.input}))
            .edge("request", "approve")
            .edge("approve", "pay", action="approved"))
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry()), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("approval")
        parked = await client.result(run_id, timeout=30)
        assert parked.status == "awaiting"
        status = await client.status(run_id)
        assert status.awaiting == ["approve"] and status.nodes["approve"] == "awaiting"
        assert await client.resume(run_id, "approve", action="approved",
                                   data={"by": "ada"}) == ["approve"]
        result = await client.result(run_id, timeout=30)
        assert result.status == "completed"
        assert result.context["_outputs.pay"] == {"paid": {"by": "ada"}}
        assert await client.reconcile(run_id) == []
        with pytest.raises(FlowcraftError, match="cannot resume"):
            await client.resume(run_id, "approve")
        with pytest.raises(RunNotFoundError):
            await client.reconcile("nope")


async def test_from_env_opens_and_closes_its_own_clients(
        cloud: str, services: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in services.environment().items():
        monkeypatch.setenv(name, value)
    if cloud == "azure":
        monkeypatch.setenv("COSMOS_DB_VERIFY_TLS", "false")
    flow, _ = chain()
    async with Client.from_env(cloud, blueprints=[flow.to_blueprint()]) as client:
        run_id = await client.start("chain")
        assert (await client.status(run_id)).status == "running"
        assert client.adapter is not None
    assert client.adapter is None


async def test_finished_runs_carry_a_time_to_live(cloud: str, services: Any) -> None:
    flow, _ = chain()
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry()), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("chain")
        await client.result(run_id, timeout=30)
        adapter = client.adapter
        record = await adapter.backend.statuses.read(run_id)
        if cloud == "aws":
            item = (await services.dynamodb.get_item(
                TableName=services.context_table, Key={"runId": {"S": run_id}}))["Item"]
            expires = int(item["_flowcraft.ttl"]["N"])
            assert abs(int(record["ttl"]) - (time.time() + 30 * 86400)) < 120
            assert abs(expires - int(record["ttl"])) < 60
        else:
            contexts = services.cosmos.get_database_client(
                services.database).get_container_client(services.context_container)
            item = await contexts.read_item(run_id, partition_key=run_id)
            assert record["ttl"] == item["ttl"] == 30 * 86400
        # The expiry is the store's, not a context key.
        context = (await client.result(run_id)).context
        assert not [key for key in context if "ttl" in key], context


def test_sync_client(aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowcraft.client import SyncClient

    for name, value in aws.environment().items():
        monkeypatch.setenv(name, value)
    flow, _ = chain()
    with SyncClient.from_env("aws", blueprints=[flow.to_blueprint()]) as client:
        run_id = client.start("chain")
        assert client.status(run_id).status == "running"
        assert [r.run_id for r in client.list_runs(status="running").items] == [run_id]
        assert client.cancel(run_id) is True
        assert client.result(run_id, timeout=5).status == "cancelled"


async def test_a_node_that_finishes_after_cancel_routes_nowhere(cloud: str,
                                                                 services: Any) -> None:
    runs = Executions()
    started = asyncio.Event()
    release = asyncio.Event()

    async def stubborn(ctx: NodeContext) -> Any:
        runs.record(ctx)
        started.set()
        await release.wait()  # ignores ctx.signal
        return "finished anyway"

    flow = (Flow("stubborn").node("a", stubborn).node("b", runs.node(lambda ctx: 1))
            .node("c", runs.node(lambda ctx: 1)).edge("a", "b").edge("b", "c"))
    bp = flow.to_blueprint()
    async with workers(cloud, services, [bp], flow.registry()), client_for(
            cloud, services, [bp]) as client:
        run_id = await client.start("stubborn")
        await asyncio.wait_for(started.wait(), 20)
        assert await client.cancel(run_id) is True
        release.set()
        for _ in range(100):
            if (await client.status(run_id)).nodes["a"] == "done":
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.5)  # time for b and c, if they were wrongly scheduled
        status = await client.status(run_id)
    assert runs.counts == {"a": 1}
    assert status.status == "cancelled"
    assert status.nodes == {"a": "done", "b": "pending", "c": "pending"}
