"""Runs started by the TypeScript library's client (``tests/js/azure_start_workflow.mjs``:
the Azure doc's ``startWorkflow`` snippet with ``@azure/cosmos`` and ``@azure/storage-queue``)
against the same local services, and finished by our Python worker.

The snippet's traps, each checked here: its queue messages are plain JSON text (not base64);
its context item has ``id`` but no ``runId`` (the containers are partitioned on ``/runId``)
and the initial context flat at the top level; its status item has no ``runId`` either, and
``lastUpdated`` as an ISO-8601 string.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from azure_helpers import (
    containers,
    decode,
    items_with_id,
    make_adapter,
    peek,
    receive_all,
    run_typescript_client,
    wait_for,
    wait_queue_empty,
    workers,
)
from distributed_helpers import Executions
from flowcraft import Flow, NodeContext, analyze_blueprint
from flowcraft.adapters.azure import create_azure_reconciler

SYSTEM = {"_rid", "_self", "_etag", "_attachments", "_ts"}


def checkout_flow(runs: Executions, seen: dict[str, Any]) -> Flow:
    """Two start nodes (so the snippet sends two messages) joining into one."""

    async def fetch_user(ctx: NodeContext) -> Any:
        runs.record(ctx)
        seen["customer"] = await ctx.context.get("customer")
        seen["items"] = await ctx.context.get("items")
        return {"name": seen["customer"]["name"]}

    async def load_cart(ctx: NodeContext) -> Any:
        runs.record(ctx)
        items = await ctx.context.get("items")
        return {"total": sum(item["price"] for item in items)}

    async def checkout(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return f"{ctx.input['fetchUser']['name']} pays {ctx.input['loadCart']['total']}"

    return (Flow("ts-checkout")
            .node("fetchUser", fetch_user).node("loadCart", load_cart)
            .node("checkout", checkout)
            .edge("fetchUser", "checkout").edge("loadCart", "checkout"))


INITIAL = {"customer": {"name": "Ada", "tier": "gold"}, "items": [{"price": 3}, {"price": 4}],
           "note": "ünïcode ✓"}


async def test_typescript_client_run_is_completed_by_the_python_worker(azure: Any,
                                                                 tmp_path: Path) -> None:
    runs, seen = Executions(), {}
    flow = checkout_flow(runs, seen)
    bp = flow.to_blueprint()
    before = time.time()
    run_id = await run_typescript_client(azure, bp, INITIAL, tmp_path)

    # What the snippet wrote, exactly as the docs have it.
    context_items, status_items = containers(azure)
    [context_item] = await items_with_id(context_items, run_id)
    assert "runId" not in context_item
    assert {k: v for k, v in context_item.items() if k not in SYSTEM} == {"id": run_id,
                                                                          **INITIAL}
    [status_item] = await items_with_id(status_items, run_id)
    assert "runId" not in status_item and status_item["status"] == "running"
    assert isinstance(status_item["lastUpdated"], str)
    written = datetime.fromisoformat(status_item["lastUpdated"].replace("Z", "+00:00"))
    assert before - 5 <= written.timestamp() <= time.time() + 5
    messages = await peek(azure.queue)
    assert all(m.content.startswith("{") for m in messages)  # plain JSON, not base64
    assert sorted(json.loads(m.content)["nodeId"] for m in messages) == sorted(
        analyze_blueprint(bp).start_node_ids) == ["fetchUser", "loadCart"]
    assert all(json.loads(m.content) == {"runId": run_id, "blueprintId": bp.id,
                                         "nodeId": json.loads(m.content)["nodeId"]}
               for m in messages)

    async with workers(azure, [bp], flow.registry(), concurrency=4) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=30)
        await wait_queue_empty(azure.queue)
    assert result.status == "completed", result.errors
    # The nodes saw the initial context the snippet wrote.
    assert seen == {"customer": INITIAL["customer"], "items": INITIAL["items"]}
    assert result.context["_outputs.checkout"] == "Ada pays 7"
    assert result.context["note"] == INITIAL["note"]
    assert runs.counts == {"fetchUser": 1, "loadCart": 1, "checkout": 1}
    # Both items now live in the run's partition, once each.
    [context_item] = await items_with_id(context_items, run_id)
    assert context_item["runId"] == run_id
    assert context_item["customer"] == INITIAL["customer"]  # still at the top level
    assert context_item["_outputs.checkout"] == "Ada pays 7" and "context" not in context_item
    [status_item] = await items_with_id(status_items, run_id)
    assert status_item["runId"] == run_id and status_item["status"] == "completed"
    assert (await worker.get_run_status(run_id))["finalStatus"] == "completed"


async def test_stalled_typescript_client_run_is_found_by_the_reconciler(azure: Any,
                                                                 tmp_path: Path) -> None:
    runs, seen = Executions(), {}
    flow = checkout_flow(runs, seen)
    bp = flow.to_blueprint()
    run_id = await run_typescript_client(azure, bp, INITIAL, tmp_path)
    # No worker ran, and the start messages are lost: only the reconciler can revive it.
    assert len(await receive_all(azure.queue)) == 2
    adapter = make_adapter(azure, [bp], flow.registry())
    reconciler = create_azure_reconciler(adapter, azure.cosmos, azure.database,
                                         azure.status_container, stalled_threshold_seconds=0)
    stats = await reconciler.run()
    assert stats.stalled_runs >= 1 and stats.reconciled_runs == stats.stalled_runs
    assert stats.failed_runs == 0
    assert sorted(decode(m.content)["nodeId"] for m in await peek(azure.queue)) == [
        "fetchUser", "loadCart"]
    # Its ISO lastUpdated was refreshed: with a threshold, it is not stalled any more.
    patient = create_azure_reconciler(adapter, azure.cosmos, azure.database,
                                      azure.status_container, stalled_threshold_seconds=60)
    assert (await patient.run()).stalled_runs == 0
    async with workers(azure, [bp], flow.registry(), concurrency=4) as (worker,):
        result = await worker.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert result.context["_outputs.checkout"] == "Ada pays 7"
    assert runs.counts == {"fetchUser": 1, "loadCart": 1, "checkout": 1}


async def test_typescript_client_run_stalled_midway_is_reconciled_by_a_multi_blueprint_worker(
        azure: Any, tmp_path: Path) -> None:
    """The snippet's status item has no ``blueprintId``. After our worker ran part of the run,
    a reconciler of a deployment that knows several blueprints must still tell which one the
    run uses (the worker that ran a node knew it)."""
    runs = Executions()
    release = asyncio.Event()

    async def second(ctx: NodeContext) -> Any:
        runs.record(ctx)
        await release.wait()
        return "second"

    flow = Flow("ts-two-step").node("first", runs.node()).node("second", second) \
        .edge("first", "second")
    other = Flow("unrelated").node("x", runs.node())
    bps = [flow.to_blueprint(), other.to_blueprint()]
    registry = {**flow.registry(), **other.registry()}
    run_id = await run_typescript_client(azure, bps[0], {"k": 1}, tmp_path)
    worker = make_adapter(azure, bps, registry)
    await worker.start()
    await wait_for(lambda: runs.counts["second"] == 1, timeout=20)
    await worker.stop(timeout_seconds=0.1)  # cancelled: its message is visible again...
    assert len(await receive_all(azure.queue)) == 1  # ...and then lost
    reconciler = create_azure_reconciler(worker, azure.cosmos, azure.database,
                                         azure.status_container, stalled_threshold_seconds=0)
    stats = await reconciler.run()
    assert (stats.stalled_runs, stats.reconciled_runs, stats.failed_runs) == (1, 1, 0)
    release.set()
    async with workers(azure, bps, registry) as (again,):
        result = await again.wait_for_result(run_id, timeout=20)
    assert result.status == "completed", result.errors
    assert runs.counts == {"first": 1, "second": 2}
