"""Observability building blocks: log context and formats, traces, metrics, health, errors."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowcraft.distributed.job import JobPayload, parse_job
from flowcraft.observability import (
    MAX_ERROR_BYTES,
    HealthServer,
    Metrics,
    TracingConfigurationError,
    configure_logging,
    configure_tracing,
    current_log_context,
    format_error,
    get_tracer,
    heartbeat,
    inject,
    log_context,
    run_span,
    service_span,
    shutdown_tracing,
    span_for_node,
)
from flowcraft.observability import health as health_module

# ------------------------------------------------------------------------------------------
# Logs
# ------------------------------------------------------------------------------------------


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    yield stream
    for handler in list(root.handlers):
        if getattr(handler, "_flowcraft", False):
            root.removeHandler(handler)
    root.handlers[:] = before[0]
    root.setLevel(before[1])


def test_json_lines_carry_the_context_fields(log_stream: io.StringIO) -> None:
    configure_logging("json", logging.INFO, stream=log_stream)
    log = logging.getLogger("flowcraft.test")
    with log_context(run_id="r1", worker_id="w1"), log_context(node_id="a", attempt=2):
        log.info("ran %s", "a", extra={"seconds": 0.5})
    log.warning("outside")
    first, second = (json.loads(line) for line in log_stream.getvalue().splitlines())
    assert first["message"] == "ran a" and first["level"] == "INFO"
    assert first["logger"] == "flowcraft.test" and first["time"].endswith("Z")
    assert (first["run_id"], first["node_id"], first["attempt"], first["worker_id"],
            first["seconds"]) == ("r1", "a", 2, "w1", 0.5)
    assert second["message"] == "outside" and "run_id" not in second


def test_json_lines_keep_the_exception(log_stream: io.StringIO) -> None:
    configure_logging("json", logging.INFO, stream=log_stream)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logging.getLogger("flowcraft.test").exception("it broke")
    (line,) = log_stream.getvalue().splitlines()  # one line, however many lines inside
    entry = json.loads(line)
    assert "ValueError: bad\nthing" in entry["exception"]


def test_human_format_is_the_default_and_shows_run_and_node(
        log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWCRAFT_LOG_FORMAT", raising=False)
    configure_logging(level=logging.INFO, stream=log_stream)
    log = logging.getLogger("flowcraft.test")
    with log_context(run_id="r1", node_id="a"):
        log.info("inside")
    log.info("outside")
    inside, outside = log_stream.getvalue().splitlines()
    assert inside.endswith("INFO flowcraft.test [run=r1 node=a]: inside")
    assert outside.endswith("INFO flowcraft.test: outside")


def test_environment_chooses_the_format_and_a_bad_one_is_a_clear_error(
        log_stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCRAFT_LOG_FORMAT", "JSON")
    configure_logging(level=logging.INFO, stream=log_stream)
    logging.getLogger("x").info("hi")
    assert json.loads(log_stream.getvalue())["message"] == "hi"
    monkeypatch.setenv("FLOWCRAFT_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match=r"unknown log format 'xml'.*human, json"):
        configure_logging()


def test_reconfiguring_replaces_the_handler(log_stream: io.StringIO) -> None:
    configure_logging("json", logging.INFO, stream=log_stream)
    configure_logging("json", logging.INFO, stream=log_stream)
    logging.getLogger("x").info("once")
    assert len(log_stream.getvalue().splitlines()) == 1


async def test_concurrent_jobs_keep_their_own_context() -> None:
    async def job(run_id: str, node_id: str) -> dict[str, object]:
        with log_context(run_id=run_id, node_id=node_id):
            await asyncio.sleep(0.01)
            return current_log_context()

    results = await asyncio.gather(*(job(f"r{i}", f"n{i}") for i in range(5)))
    assert results == [{"run_id": f"r{i}", "node_id": f"n{i}"} for i in range(5)]
    assert current_log_context() == {}


# ------------------------------------------------------------------------------------------
# Traces
# ------------------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[object]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert configure_tracing(tracer_provider=provider)
    yield exporter
    shutdown_tracing()


def test_a_run_is_one_trace_carried_through_job_messages(spans: object) -> None:
    with run_span("r1", "bp"):
        start_job = JobPayload("r1", "bp", "a", trace=inject())
    # Another worker receives the job: the node span continues the run's trace.
    received = parse_job(start_job.to_json())
    with span_for_node("r1", "bp", "a", 1, "w1", parent=received.trace) as node:
        with service_span("claim"):
            pass
        node.set_outcome("completed")
        next_job = JobPayload("r1", "bp", "b", trace=inject())
    with span_for_node("r1", "bp", "b", 1, "w2", parent=parse_job(next_job.to_json()).trace):
        pass
    finished = {span.name: span for span in spans.get_finished_spans()}  # type: ignore[attr-defined]
    run, a, claim, b = (finished[n] for n in ("run bp", "node a", "claim", "node b"))
    assert len({s.context.trace_id for s in (run, a, claim, b)}) == 1
    assert run.parent is None
    assert a.parent.span_id == run.context.span_id
    assert claim.parent.span_id == a.context.span_id
    assert b.parent.span_id == a.context.span_id
    assert dict(a.attributes) == {
        "flowcraft.run_id": "r1", "flowcraft.blueprint_id": "bp", "flowcraft.node_id": "a",
        "flowcraft.attempt": 1, "flowcraft.worker_id": "w1", "flowcraft.outcome": "completed",
    }


def test_a_node_span_records_the_error(spans: object) -> None:
    with pytest.raises(RuntimeError), span_for_node("r", "bp", "a"):
        raise RuntimeError("boom")
    (span,) = spans.get_finished_spans()  # type: ignore[attr-defined]
    assert span.status.status_code.name == "ERROR"
    assert span.events[0].name == "exception"


@pytest.mark.parametrize("field", [None, {}, {"traceparent": "garbage"},
                                   {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}])
def test_a_job_without_usable_trace_context_starts_a_new_trace(spans: object,
                                                               field: object) -> None:
    with span_for_node("r", "bp", "a", parent=field):  # type: ignore[arg-type]
        pass
    (span,) = spans.get_finished_spans()  # type: ignore[attr-defined]
    assert span.parent is None


def test_tracing_off_is_a_shared_no_op() -> None:
    shutdown_tracing()
    tracer = get_tracer()
    assert not tracer.enabled and inject() is None
    with span_for_node("r", "bp", "a") as first, service_span("claim") as second:
        first.set_outcome("completed")
    assert first is second  # one object: nothing is allocated per node


def test_unknown_exporter_is_a_clear_error() -> None:
    with pytest.raises(TracingConfigurationError, match="unknown trace exporter jaeger"):
        configure_tracing("jaeger")
    assert configure_tracing("none") is False and not get_tracer().enabled


def test_console_exporter_writes_one_json_span_per_line() -> None:
    from flowcraft.observability import flush_tracing

    out = io.StringIO()
    assert configure_tracing("console", console_stream=out)
    with run_span("r1", "bp"):
        pass
    flush_tracing()  # sent now, while tracing stays on
    assert get_tracer().enabled
    (line,) = out.getvalue().splitlines()
    shutdown_tracing()
    span = json.loads(line)
    assert span["name"] == "run bp" and span["attributes"]["flowcraft.run_id"] == "r1"
    assert span["resource"]["attributes"]["service.name"] == "flowcraft"


def _run_isolated(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], text=True,
                          capture_output=True, timeout=60, env={**os.environ, **env})


def test_without_the_extra_nothing_imports_opentelemetry() -> None:
    result = _run_isolated("""
        import sys
        sys.modules["opentelemetry"] = None  # as if the extra were not installed
        from flowcraft.observability import configure_tracing, inject, span_for_node
        from flowcraft.distributed import adapter
        assert configure_tracing() is False
        with span_for_node("r", "bp", "a") as span:
            span.set_outcome("completed")
        assert inject() is None
        try:
            configure_tracing("otlp")
        except Exception as exc:
            print(type(exc).__name__, exc)
    """, OTEL_TRACES_EXPORTER="")
    assert result.returncode == 0, result.stderr
    assert "TracingConfigurationError" in result.stdout
    assert "install the otel extra" in result.stdout


def test_importing_flowcraft_does_not_import_opentelemetry() -> None:
    result = _run_isolated("""
        import sys
        import flowcraft, flowcraft.observability, flowcraft.distributed.adapter
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_metrics_render_in_the_prometheus_text_format() -> None:
    metrics = Metrics(duration_buckets=(0.1, 1.0))
    metrics.node_finished("completed", 0.05)
    metrics.node_finished("completed", 0.5)
    metrics.node_finished("failed", 3.0)
    metrics.message_received(2.0, redelivered=False)
    metrics.message_received(None, redelivered=True)
    metrics.claim_lost()
    for operation in ("claim", "commit", "claim"):
        metrics.service_request(operation)
    metrics.run_started()
    metrics.run_finished("completed")
    text = metrics.render()
    samples = _samples(text)
    assert samples['flowcraft_node_executions_total{outcome="completed"}'] == 2
    assert samples['flowcraft_node_executions_total{outcome="failed"}'] == 1
    assert samples['flowcraft_node_duration_seconds_bucket{le="0.1"}'] == 1
    assert samples['flowcraft_node_duration_seconds_bucket{le="1.0"}'] == 2
    assert samples['flowcraft_node_duration_seconds_bucket{le="+Inf"}'] == 3
    assert samples["flowcraft_node_duration_seconds_sum"] == pytest.approx(3.55)
    assert samples["flowcraft_queue_lag_seconds_count"] == 1
    assert samples["flowcraft_messages_received_total"] == 2
    assert samples["flowcraft_message_redeliveries_total"] == 1
    assert samples["flowcraft_claims_lost_total"] == 1
    assert samples['flowcraft_service_requests_total{operation="claim"}'] == 2
    assert samples["flowcraft_runs_started_total"] == 1
    assert samples['flowcraft_runs_finished_total{status="completed"}'] == 1
    assert "# TYPE flowcraft_node_duration_seconds histogram" in text
    assert "# TYPE flowcraft_claims_lost_total counter" in text


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.service_request('we"ird\\op\n')
    assert 'operation="we\\"ird\\\\op\\n"' in metrics.render()


@given(st.lists(st.floats(min_value=0, max_value=1e6), max_size=50))
def test_histogram_buckets_are_cumulative_and_end_with_the_count(values: list[float]) -> None:
    metrics = Metrics()
    for value in values:
        metrics.node_finished("completed", value)
    buckets = [v for k, v in _samples(metrics.render()).items()
               if k.startswith("flowcraft_node_duration_seconds_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == len(values)


# ------------------------------------------------------------------------------------------
# Health server
# ------------------------------------------------------------------------------------------


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode()
    writer.close()
    head, _, body = response.partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


async def test_health_server_reports_liveness_from_the_heartbeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health_module, "_last_heartbeat", None)
    async with HealthServer(0, stale_after_seconds=0.2) as server:
        assert server.port != 0
        status, body = await _get(server.port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        await asyncio.sleep(0.3)
        status, body = await _get(server.port, "/healthz")
        assert status == 503 and json.loads(body)["status"] == "stalled"
        heartbeat()
        assert (await _get(server.port, "/healthz"))[0] == 200


async def test_readiness_runs_the_workers_check() -> None:
    state = {"ready": True}

    async def check() -> bool:
        if state["ready"] is None:
            raise ConnectionError("queue unreachable")
        return bool(state["ready"])

    heartbeat()
    async with HealthServer(0, ready_check=check) as server:
        assert (await _get(server.port, "/readyz"))[0] == 200
        state["ready"] = False
        assert (await _get(server.port, "/readyz"))[0] == 503
        state["ready"] = None  # type: ignore[assignment]
        status, body = await _get(server.port, "/readyz")
        assert status == 503
        assert json.loads(body)["reason"] == "ConnectionError: queue unreachable"


async def test_a_slow_readiness_check_times_out() -> None:
    async def slow() -> bool:
        await asyncio.sleep(5)
        return True

    heartbeat()
    async with HealthServer(0, ready_check=slow, ready_timeout_seconds=0.1) as server:
        status, body = await _get(server.port, "/readyz")
    assert status == 503 and "took over 0.1s" in json.loads(body)["reason"]


async def test_metrics_and_unknown_paths() -> None:
    metrics = Metrics()
    metrics.run_started()
    async with HealthServer(0, metrics=metrics) as server:
        status, body = await _get(server.port, "/metrics")
        assert status == 200 and "flowcraft_runs_started_total 1" in body
        assert (await _get(server.port, "/nope"))[0] == 404
        assert (await _get(server.port, "/healthz", "POST"))[0] == 405
        status, body = await _get(server.port, "/healthz", "HEAD")
        assert status == 200 and body == ""


async def test_stats_serves_the_metrics_and_what_the_stats_source_adds_as_json() -> None:
    metrics = Metrics()
    metrics.node_finished("completed", 0.5)
    metrics.node_finished("completed", 0.25)
    metrics.message_received(1.0, redelivered=True)
    metrics.service_request("commit")
    metrics.run_finished("completed")
    requests = {"sqs.ReceiveMessage": 3}
    async with HealthServer(0, metrics=metrics,
                            stats=lambda: {"serviceRequests": dict(requests)}) as server:
        status, body = await _get(server.port, "/stats")
        assert status == 200
        assert json.loads(body) == {
            "nodeExecutions": {"completed": 2}, "nodeSeconds": 0.75, "messagesReceived": 1,
            "messageRedeliveries": 1, "claimsLost": 0, "operations": {"commit": 1},
            "runsStarted": 0, "runsFinished": {"completed": 1},
            "serviceRequests": {"sqs.ReceiveMessage": 3}}
        requests["sqs.ReceiveMessage"] = 4  # read at each request, not once
        assert json.loads((await _get(server.port, "/stats"))[1])["serviceRequests"] == {
            "sqs.ReceiveMessage": 4}
        assert await _get(server.port, "/stats", "HEAD") == (200, "")


async def test_stats_without_a_source_shows_the_metrics_and_a_failing_source_is_a_500(
        caplog: pytest.LogCaptureFixture) -> None:
    async with HealthServer(0, metrics=Metrics()) as server:
        status, body = await _get(server.port, "/stats")
    assert status == 200 and json.loads(body)["nodeExecutions"] == {}
    assert "serviceRequests" not in json.loads(body)

    def broken() -> dict[str, int]:
        raise KeyError("gone")

    async with HealthServer(0, metrics=Metrics(), stats=broken) as server:
        status, body = await _get(server.port, "/stats")
        assert status == 500 and json.loads(body) == {"error": "KeyError: 'gone'"}
        heartbeat()
        assert (await _get(server.port, "/healthz"))[0] == 200  # the server goes on


async def test_a_client_sending_garbage_does_not_break_the_server() -> None:
    async with HealthServer(0) as server:
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\x00\x01garbage")
        writer.close()
        heartbeat()
        assert (await _get(server.port, "/healthz"))[0] == 200


# ------------------------------------------------------------------------------------------
# Failure details
# ------------------------------------------------------------------------------------------


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_format_error_names_type_message_and_where() -> None:
    def inner() -> None:
        raise KeyError("missing")

    try:
        inner()
    except KeyError as exc:
        error = format_error(exc)
    assert error["type"] == "KeyError" and error["message"] == "'missing'"
    assert "in inner" in error["traceback"] and error["traceback"].endswith(
        "KeyError: 'missing'\n")
    assert format_error(_raised(TracingConfigurationError("x")))["type"] == (
        "flowcraft.observability.tracing.TracingConfigurationError")


def test_a_long_error_keeps_the_message_start_and_the_traceback_end() -> None:
    error = format_error(_raised(ValueError("start " + "x" * 10_000 + " end")))
    assert len(json.dumps(error).encode()) <= MAX_ERROR_BYTES
    assert error["message"].startswith("start ") and error["message"].endswith("...")
    assert error["traceback"].startswith("...\n") and error["traceback"].endswith(" end\n")


@given(st.text(max_size=6000), st.integers(min_value=0, max_value=60))
def test_format_error_always_fits(message: str, depth: int) -> None:
    def recurse(level: int) -> None:
        if level == 0:
            raise RuntimeError(message)
        recurse(level - 1)

    try:
        recurse(depth)
    except RuntimeError as exc:
        error = format_error(exc)
    assert set(error) == {"type", "message", "traceback"}
    assert len(json.dumps(error).encode()) <= MAX_ERROR_BYTES
    assert error["type"] == "RuntimeError"


# ------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------

EXAMPLE = str(__import__("pathlib").Path(__file__).resolve().parents[1]
              / "src" / "flowcraft" / "examples" / "order_pipeline.json")


@pytest.mark.parametrize(("variable", "value", "fragment"), [
    ("FLOWCRAFT_LOG_FORMAT", "xml", "unknown log format 'xml'"),
    ("OTEL_TRACES_EXPORTER", "jaeger", "unknown trace exporter jaeger"),
])
def test_bad_observability_settings_are_one_line_errors(variable: str, value: str,
                                                        fragment: str) -> None:
    import os

    result = subprocess.run([sys.executable, "-m", "flowcraft", "graph", EXAMPLE], text=True,
                            capture_output=True, timeout=60,
                            env={**os.environ, variable: value})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("flowcraft: ") and fragment in line



async def test_worker_ready_check_reads_the_stores() -> None:
    from flowcraft import FlowRuntime
    from flowcraft.distributed.backend import Backend
    from flowcraft.distributed.inprocess import InProcessAdapter
    from flowcraft.observability import worker_ready_check

    adapter = InProcessAdapter(FlowRuntime(blueprints={}, registry={}).options)
    assert await worker_ready_check(adapter)() is True

    class Unreachable(InProcessAdapter):
        def create_backend(self) -> Backend:
            backend = super().create_backend()

            async def read(run_id: str) -> None:
                raise ConnectionError("status store unreachable")

            backend.statuses.read = read  # type: ignore[method-assign]
            return backend

    heartbeat()
    broken = Unreachable(FlowRuntime(blueprints={}, registry={}).options)
    async with HealthServer(0, ready_check=worker_ready_check(broken)) as server:
        status, body = await _get(server.port, "/readyz")
    assert status == 503 and "status store unreachable" in json.loads(body)["reason"]
