"""Three ``flowcraft worker aws`` processes export their spans over OTLP/HTTP to a receiver
in this test: one run is one trace whose parent links follow the job messages; the workers
log JSON lines and serve health, metrics and their counts (``/stats``)."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from aws_helpers import make_moto_dynamodb_atomic
from flowcraft.local import free_port

pytestmark = pytest.mark.integration

REGISTRY = '''
import asyncio

async def step(ctx):
    await asyncio.sleep(0.2)
    return ctx.node_id

registry = {"obs.step": step}
'''

# a -> (b1, b2, b3) -> j -> k: a fan-out over the workers, an all join, a chain.
BLUEPRINT = {
    "id": "traced",
    "nodes": [{"id": i, "uses": "obs.step"} for i in ("a", "b1", "b2", "b3", "j", "k")],
    "edges": [{"source": s, "target": t} for s, t in (
        ("a", "b1"), ("a", "b2"), ("a", "b3"), ("b1", "j"), ("b2", "j"), ("b3", "j"),
        ("j", "k"))],
}


@pytest.fixture(autouse=True)
def _atomic_dynamodb(monkeypatch: pytest.MonkeyPatch) -> None:
    make_moto_dynamodb_atomic(monkeypatch)


class OtlpReceiver:
    """An OTLP/HTTP trace endpoint keeping every span it is sent, with its service name."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[tuple[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
                for resource_spans in request.resource_spans:
                    service = next(a.value.string_value for a in
                                   resource_spans.resource.attributes
                                   if a.key == "service.name")
                    for scope in resource_spans.scope_spans:
                        receiver.spans.extend((service, span) for span in scope.spans)
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    pytest.importorskip("opentelemetry.proto", reason="needs the otel extra")
    found = OtlpReceiver()
    yield found
    found.server.shutdown()


def attributes(span: Any) -> dict[str, Any]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = value.int_value if value.HasField("int_value") else (
            value.string_value)
    return values


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def test_three_workers_export_one_trace_per_run(aws: Any, tmp_path: Path,
                                                      receiver: OtlpReceiver) -> None:
    (tmp_path / "blueprints").mkdir()
    (tmp_path / "blueprints" / "traced.json").write_text(json.dumps(BLUEPRINT))
    (tmp_path / "obs_nodes.py").write_text(REGISTRY)
    env = aws.environment() | {
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_SERVICE_NAME": "flowcraft-test", "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    blueprints = str(tmp_path / "blueprints")
    health_ports = [free_port() for _ in range(3)]
    health_port = health_ports[0]
    workers = []
    for index in range(3):
        extra = ["--health-port", str(health_ports[index])]
        workers.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowcraft", "-v", "worker", "aws", "--registry",
            "obs_nodes.py:registry", "--blueprints", blueprints, "--concurrency", "1",
            "--lease-seconds", "10", "--log-format", "json", *extra,
            env=env, cwd=tmp_path, stdout=(tmp_path / f"worker{index}.out").open("w"),
            stderr=(tmp_path / f"worker{index}.err").open("w")))
    try:
        start = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "flowcraft", "start", "aws", "traced", "--blueprints",
            blueprints, "--wait", "--timeout", "60", env=env, cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(start.communicate(), 90)
        assert start.returncode == 0, err.decode()
        run_id, _, result = out.decode().partition("\n")
        assert json.loads(result)["status"] == "completed"

        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{health_port}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{health_port}/readyz")
        assert status == 200, body
        totals: dict[str, float] = {}
        for port in health_ports:
            status, metrics = await asyncio.to_thread(http_get,
                                                      f"http://127.0.0.1:{port}/metrics")
            assert status == 200, metrics
            for line in metrics.splitlines():
                if line and not line.startswith("#"):
                    name, value = line.rsplit(" ", 1)
                    totals[name] = totals.get(name, 0) + float(value)
        assert totals['flowcraft_node_executions_total{outcome="completed"}'] == 6
        # SQS's SentTimestamp gives every received message an age.
        received = totals["flowcraft_messages_received_total"]
        assert received >= 4 and totals["flowcraft_queue_lag_seconds_count"] == received
        assert totals['flowcraft_service_requests_total{operation="commit"}'] == 6

        stats = []
        for port in health_ports:
            status, body = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/stats")
            assert status == 200, body
            stats.append(json.loads(body))
        assert [s["backend"] for s in stats] == ["aws"] * 3
        assert len({s["worker"] for s in stats}) == 3 and all(s["worker"] for s in stats)
        assert sum(s["nodeExecutions"].get("completed", 0) for s in stats) == 6
        assert sum(s["operations"].get("commit", 0) for s in stats) == 6
        assert all(s["serviceRequests"].get("sqs.ReceiveMessage", 0) >= 1 for s in stats)
        # Each node's commit is a conditional update of its run's context.
        assert sum(s["serviceRequests"].get("dynamodb.UpdateItem", 0) for s in stats) >= 6
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(worker.wait(), 30) for worker in workers]
    assert codes == [0, 0, 0], [(tmp_path / f"worker{i}.err").read_text() for i in range(3)]
    prefix = "flowcraft worker: service calls "
    for index, counted in enumerate(stats):
        # What a worker reports on leaving includes what /stats showed before it stopped.
        (line,) = [line for line in (tmp_path / f"worker{index}.out").read_text().splitlines()
                   if line.startswith(prefix)]
        final = json.loads(line.removeprefix(prefix))
        assert all(final.get(name, 0) >= count
                   for name, count in counted["serviceRequests"].items()), (counted, final)

    spans = [span for service, span in receiver.spans
             if service == "flowcraft-test" and attributes(span).get("flowcraft.run_id") in (
                 run_id, None)]
    (run,) = [span for span in spans if span.name == "run traced"]
    trace = [span for span in spans if span.trace_id == run.trace_id]
    by_id = {span.span_id: span for span in trace}
    nodes = {attributes(s)["flowcraft.node_id"]: s for s in trace if s.name.startswith("node ")}
    assert set(nodes) == {"a", "b1", "b2", "b3", "j", "k"}
    assert not run.parent_span_id
    assert nodes["a"].parent_span_id == run.span_id
    for branch in ("b1", "b2", "b3"):
        assert nodes[branch].parent_span_id == nodes["a"].span_id
    assert by_id[nodes["j"].parent_span_id].name in ("node b1", "node b2", "node b3")
    assert nodes["k"].parent_span_id == nodes["j"].span_id
    for node_id, span in nodes.items():
        assert attributes(span)["flowcraft.outcome"] == "completed", node_id
        # b1 and k run as local continuations of a and j, in the same worker, claimed by
        # their predecessor's commit: no message of their own, so no delivery attempt.
        continued = node_id in ("b1", "k")
        assert attributes(span).get("flowcraft.attempt") == (None if continued else 1)
    services = [span for span in trace if span.name in ("claim", "commit", "enqueue")]
    assert {span.name for span in services} == {"claim", "commit", "enqueue"}
    assert all(by_id[span.parent_span_id].name.startswith(("node ", "run "))
               for span in services)
    # No span of any other trace claims to belong to this run.
    assert all(span.trace_id == run.trace_id for span in spans
               if attributes(span).get("flowcraft.run_id") == run_id)

    lines = [json.loads(line) for index in range(3)
             for line in (tmp_path / f"worker{index}.err").read_text().splitlines()]
    tagged = [line for line in lines if line.get("node_id")]
    assert tagged and all(line["run_id"] == run_id and line["worker_id"] for line in tagged)
