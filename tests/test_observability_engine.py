"""The job algorithm reports to the observability pieces: one trace per run across
workers, log lines tagged with run and node, metrics of what happened."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from distributed_helpers import Cluster
from flowcraft import NodeContext, WorkflowBlueprint
from flowcraft.observability import (
    Metrics,
    configure_tracing,
    log_context,
    shutdown_tracing,
)
from flowcraft.observability import metrics as metrics_module
from flowcraft.observability.logs import JsonFormatter

# s -> (a -> a2 | b) -> j -> end: a chain inside (a -> a2, run by local continuation),
# a fan-out and an all join.
DIAMOND = WorkflowBlueprint.model_validate({
    "id": "diamond",
    "nodes": [{"id": i, "uses": "step"} for i in ("s", "a", "a2", "b", "j", "end")],
    "edges": [{"source": s, "target": t} for s, t in (
        ("s", "a"), ("s", "b"), ("a", "a2"), ("a2", "j"), ("b", "j"), ("j", "end"))],
})
FAILING = WorkflowBlueprint.model_validate({
    "id": "failing",
    "nodes": [{"id": "s", "uses": "step"}, {"id": "boom", "uses": "boom"}],
    "edges": [{"source": "s", "target": "boom"}],
})


async def step(ctx: NodeContext) -> Any:
    logging.getLogger("flowcraft.test.node").info("node code runs")
    return ctx.node_id


async def boom(ctx: NodeContext) -> Any:
    raise RuntimeError("boom")


REGISTRY = {"step": step, "boom": boom}


@pytest.fixture
def spans() -> Iterator[Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    configure_tracing(tracer_provider=provider)
    yield exporter
    shutdown_tracing()


@pytest.fixture
def metrics(monkeypatch: pytest.MonkeyPatch) -> Metrics:
    fresh = Metrics()
    monkeypatch.setattr(metrics_module, "_metrics", fresh)
    return fresh


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def node_spans(exporter: Any, run_id: str) -> dict[str, Any]:
    found = {}
    for span in exporter.get_finished_spans():
        attributes = dict(span.attributes)
        if attributes.get("flowcraft.run_id") == run_id and span.name.startswith("node "):
            assert attributes["flowcraft.node_id"] not in found, "one span per node"
            found[attributes["flowcraft.node_id"]] = span
    return found


async def test_a_run_over_three_workers_is_one_trace(spans: Any, metrics: Metrics) -> None:
    async with Cluster([DIAMOND], REGISTRY, workers=3) as cluster:
        result = await cluster.run(DIAMOND, run_id="traced")
        await cluster.settle()
    assert result.status == "completed"
    finished = spans.get_finished_spans()
    (run,) = [s for s in finished if s.name == "run diamond"]
    nodes = node_spans(spans, "traced")
    assert set(nodes) == {"s", "a", "a2", "b", "j", "end"}
    by_id = {s.context.span_id: s for s in finished}
    assert {s.context.trace_id for s in finished} == {run.context.trace_id}
    assert run.parent is None
    assert nodes["s"].parent.span_id == run.context.span_id
    assert nodes["a"].parent.span_id == nodes["s"].context.span_id
    assert nodes["b"].parent.span_id == nodes["s"].context.span_id
    assert nodes["a2"].parent.span_id == nodes["a"].context.span_id  # local continuation
    assert nodes["j"].parent.span_id in {nodes["a2"].context.span_id,
                                         nodes["b"].context.span_id}
    assert nodes["end"].parent.span_id == nodes["j"].context.span_id
    for node_id, span in nodes.items():
        assert span.attributes["flowcraft.outcome"] == "completed", node_id
        assert span.attributes["flowcraft.blueprint_id"] == "diamond"
        assert span.attributes["flowcraft.worker_id"] in {w.worker_id for w in cluster.workers}
    services = [s for s in finished if s.name in ("claim", "commit", "enqueue")]
    assert {s.name for s in services} == {"claim", "commit", "enqueue"}
    for span in services:
        parent = by_id[span.parent.span_id]
        assert parent.name.startswith(("node ", "run ")), span.name
    # One claim per received job (a local continuation is claimed by its predecessor's
    # commit); one commit per node.
    snapshot = metrics.snapshot()
    assert snapshot["node_executions"] == {"completed": 6}
    assert snapshot["service_requests"]["claim"] == snapshot["messages_received"] < 6
    assert snapshot["service_requests"]["commit"] == 6
    assert snapshot["runs_started"] == 1 and snapshot["runs_finished"] == {"completed": 1}
    assert snapshot["message_redeliveries"] == 0


async def test_a_failed_node_span_and_metrics(spans: Any, metrics: Metrics) -> None:
    async with Cluster([FAILING], REGISTRY, workers=2) as cluster:
        result = await cluster.run(FAILING, run_id="failing-run")
        await cluster.settle()
    assert result.status == "failed"
    nodes = node_spans(spans, "failing-run")
    assert nodes["boom"].attributes["flowcraft.outcome"] == "failed"
    assert nodes["boom"].status.status_code.name == "ERROR"
    assert "boom" in nodes["boom"].attributes["flowcraft.error"]
    assert nodes["s"].status.status_code.name == "UNSET"
    assert metrics.snapshot()["node_executions"] == {"completed": 1, "failed": 1}
    assert metrics.snapshot()["runs_finished"] == {"failed": 1}


async def test_log_lines_of_a_job_name_its_run_node_and_worker(json_logs: io.StringIO,
                                                               metrics: Metrics) -> None:
    shutdown_tracing()
    async with Cluster([DIAMOND], REGISTRY, workers=2) as cluster:
        result = await cluster.run(DIAMOND, run_id="logged")
        await cluster.settle()
    assert result.status == "completed"
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    from_nodes = [line for line in lines if line["logger"] == "flowcraft.test.node"]
    assert sorted(line["node_id"] for line in from_nodes) == sorted(
        ["s", "a", "a2", "b", "j", "end"])
    workers = {w.worker_id for w in cluster.workers}
    for line in from_nodes:
        assert line["run_id"] == "logged" and line["worker_id"] in workers


async def test_job_messages_carry_no_trace_field_when_tracing_is_off(metrics: Metrics) -> None:
    shutdown_tracing()
    sent: list[str] = []
    async with Cluster([DIAMOND], REGISTRY, workers=1) as cluster:
        original = cluster.queue.send

        async def recording_send(bodies: Any, delay_seconds: float = 0) -> None:
            sent.extend(bodies)
            await original(bodies, delay_seconds)

        cluster.queue.send = recording_send  # type: ignore[method-assign]
        assert (await cluster.run(DIAMOND)).status == "completed"
    assert sent and all("trace" not in json.loads(body) for body in sent)


def test_log_context_outside_a_job_is_empty() -> None:
    with log_context(run_id="r"):
        pass
    from flowcraft.observability import current_log_context

    assert current_log_context() == {}


async def test_a_lost_lease_is_counted_and_marks_the_span(spans: Any, metrics: Metrics) -> None:
    from flowcraft.distributed.context import lock_key

    cluster_ref: list[Cluster] = []

    async def stolen(ctx: NodeContext) -> Any:
        # Another worker takes the node over while it runs (its lease lapsed, say).
        context = cluster_ref[0].store.context(ctx.run_id)
        owner = (await context.load())[lock_key(ctx.node_id)]["owner"]
        await context.release(ctx.node_id, owner)
        assert (await context.claim(ctx.node_id, 0, "thief", 60)).data is not None
        return "discarded"

    bp = WorkflowBlueprint.model_validate({"id": "stolen",
                                           "nodes": [{"id": "x", "uses": "stolen"}]})
    async with Cluster([bp], {"stolen": stolen}, workers=1) as cluster:
        cluster_ref.append(cluster)
        run_id = await cluster.client.start_workflow(bp, run_id="stolen-run")
        await cluster.settle()
    assert metrics.snapshot()["claims_lost"] == 1
    assert node_spans(spans, run_id)["x"].attributes["flowcraft.outcome"] == "lost"
