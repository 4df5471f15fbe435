"""The AWS guide's own JavaScript client (``tests/js/aws_start_workflow.mjs``: its
``startWorkflow`` snippet, run with Node and the AWS SDK v3) starts runs on the same moto
server; our Python workers and reconciler must handle them.

What the snippet writes differs from the Python client: the initial context is nested
under a ``context`` attribute, the status record has no ``blueprintId``, ``lastUpdated`` is
an ISO-8601 string, and no ``blueprintVersion`` is stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aws_helpers import (
    make_adapter,
    make_moto_dynamodb_atomic,
    peek,
    raw_item,
    receive_all,
    run_js_start_workflow,
    workers,
)
from distributed_helpers import Executions
from flowcraft import Flow, NodeContext
from flowcraft.adapters.aws import create_sqs_reconciler

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)  # see aws_helpers: moto loses concurrent updates


INITIAL = {"orderId": 7, "price": 9.5, "customer": {"name": "Ada", "tags": ["vip"]},
           "secret": "s3cr3t"}


def order_flow(runs: Executions) -> Flow:
    """Two start nodes (so the snippet sends a batch of two jobs) joined by ``summary``."""

    async def greet(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return f"Hello, {ctx.input['name']}"  # input: the initial context's 'customer'

    async def price(ctx: NodeContext) -> Any:
        runs.record(ctx)
        order_id, price_ = await ctx.context.get("orderId"), await ctx.context.get("price")
        assert type(order_id) is int and type(price_) is float, (order_id, price_)
        await ctx.context.delete("secret")  # an initial key can be removed
        return {"orderId": order_id, "total": price_ * 2}

    async def summary(ctx: NodeContext) -> Any:
        runs.record(ctx)
        return {"greeting": ctx.input["greet"], **ctx.input["price"],
                "tags": (await ctx.context.get("customer"))["tags"]}

    return (Flow("ts-order", version="2")
            .node("greet", greet, inputs="customer")
            .node("price", price)
            .node("summary", summary)
            .edge("greet", "summary").edge("price", "summary"))


async def test_run_started_by_the_seed_js_client_completes_on_a_python_worker(
        aws: Any, tmp_path: Path) -> None:
    runs = Executions()
    flow = order_flow(runs)
    bp = flow.to_blueprint()
    run_id, _ = run_js_start_workflow(aws.environment(), bp, INITIAL, tmp_path)

    # What the snippet wrote, as the documentation shows it.
    item = await raw_item(aws, aws.context_table, {"runId": run_id})
    assert item is not None and set(item) == {"runId", "context"}
    status_item = await raw_item(aws, aws.status_table, {"runId": run_id})
    assert status_item is not None and status_item["status"] == {"S": "running"}
    assert "S" in status_item["lastUpdated"] and "blueprintId" not in status_item
    jobs = [json.loads(m["Body"]) for m in await peek(aws.sqs, aws.queue_url)]
    assert sorted(jobs, key=lambda j: j["nodeId"]) == [
        {"runId": run_id, "blueprintId": "ts-order", "nodeId": "greet"},
        {"runId": run_id, "blueprintId": "ts-order", "nodeId": "price"}]

    async with workers(aws, [bp], flow.registry(), count=2) as (worker, _):
        status = await worker.get_run_status(run_id)
        assert status["runId"] == run_id
        result = await worker.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert runs.counts == {"greet": 1, "price": 1, "summary": 1}
    assert result.context["_outputs.summary"] == {
        "greeting": "Hello, Ada", "orderId": 7, "total": 19.0, "tags": ["vip"]}
    # The initial keys are top-level context keys; the deleted one is gone for good.
    assert result.context["orderId"] == 7 and result.context["customer"]["name"] == "Ada"
    assert "secret" not in result.context and "context" not in result.context
    stored = await raw_item(aws, aws.context_table, {"runId": run_id})
    assert "context" not in stored and "secret" not in stored
    assert (await worker.get_run_status(run_id))["finalStatus"] == "completed"


async def test_stalled_typescript_client_run_is_found_by_the_reconciler(
        aws: Any, tmp_path: Path) -> None:
    """The reference compares the ISO ``lastUpdated`` with a number and never finds these
    runs; ours does."""
    runs = Executions()
    flow = order_flow(runs)
    bp = flow.to_blueprint()
    run_id, _ = run_js_start_workflow(aws.environment(), bp, INITIAL, tmp_path)
    client = make_adapter(aws, [bp], flow.registry())

    # Recent: the ISO string sorts in the status index, which returns only older runs.
    patient = await create_sqs_reconciler(client, aws.dynamodb, aws.status_table, 300).run()
    assert (patient.scanned_items, patient.stalled_runs) == (0, 0)

    stats = await create_sqs_reconciler(client, aws.dynamodb, aws.status_table,
                                        stalled_threshold_seconds=0).run()
    assert stats.stalled_runs >= 1 and stats.reconciled_runs >= 1 and stats.failed_runs == 0
    queued = [json.loads(m["Body"]) for m in await peek(aws.sqs, aws.queue_url)]
    assert sorted(j["nodeId"] for j in queued) == ["greet", "greet", "price", "price"]

    async with workers(aws, [bp], flow.registry(), count=2) as (worker, _):
        result = await worker.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert runs.counts == {"greet": 1, "price": 1, "summary": 1}  # duplicates ran nothing


async def test_typescript_client_run_that_lost_a_message_is_reconciled_by_a_multi_blueprint_worker(
        aws: Any, tmp_path: Path) -> None:
    """A real worker knows several blueprints. The snippet's status record names none, so
    the worker that processes a job of the run must record it for ``reconcile``."""
    runs = Executions()
    flow = (Flow("two-steps").node("first", runs.node()).node("second", runs.node())
            .edge("first", "second"))
    other = Flow("unrelated").node("x", runs.node())
    bps = [flow.to_blueprint(), other.to_blueprint()]
    registry = {**flow.registry(), **other.registry()}
    run_id, _ = run_js_start_workflow(aws.environment(), bps[0], {"n": 1}, tmp_path)

    worker = make_adapter(aws, bps, registry, local_continuation=False)
    (start,) = await receive_all(aws.sqs, aws.queue_url)
    assert await worker.handle_job(start["Body"]) == "processed"  # 'first' ran ...
    (lost,) = await receive_all(aws.sqs, aws.queue_url)  # ... and 'second's job is lost
    assert json.loads(lost["Body"])["nodeId"] == "second"

    stats = await create_sqs_reconciler(worker, aws.dynamodb, aws.status_table, 0).run()
    assert (stats.stalled_runs, stats.reconciled_runs, stats.failed_runs) == (1, 1, 0)
    async with workers(aws, bps, registry):
        result = await worker.wait_for_result(run_id, timeout=30)
    assert result.status == "completed", result.errors
    assert runs.counts == {"first": 1, "second": 1}
