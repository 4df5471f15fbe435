"""Observability of runs: structured logs, traces, metrics, health checks, error details.

Each piece stands alone and costs nothing until used:

* :mod:`.logs` — :func:`log_context` tags every log line of a job with its run, node,
  attempt and worker; :func:`configure_logging` picks the human or the JSON format.
* :mod:`.tracing` — OpenTelemetry spans, one trace per run, carried from job to job in
  the message's optional ``trace`` field; a no-op (and no import of OpenTelemetry) unless
  :func:`configure_tracing` turns it on.
* :mod:`.metrics` — :class:`Metrics`, counters and histograms in the Prometheus text format.
* :mod:`.health` — :class:`HealthServer`: ``/healthz``, ``/readyz`` and ``/metrics``.
* :mod:`.failures` — :func:`format_error`, an exception as a small, bounded record.
"""

from __future__ import annotations

from typing import Any

from .failures import MAX_ERROR_BYTES, format_error
from .health import HealthServer, heartbeat, last_heartbeat_age, worker_ready_check
from .logs import (
    HumanFormatter,
    JsonFormatter,
    configure_logging,
    current_log_context,
    log_context,
)
from .metrics import Metrics, get_metrics
from .tracing import (
    Tracer,
    TracingConfigurationError,
    configure_tracing,
    extract,
    flush_tracing,
    get_tracer,
    inject,
    run_span,
    service_span,
    shutdown_tracing,
    span_for_node,
)


def service_call(operation: str, **attributes: Any) -> Any:
    """Count one service call in the process metrics and return its span (a context
    manager; a shared no-op when tracing is off)."""
    get_metrics().service_request(operation)
    return get_tracer().service_span(operation, **attributes)


__all__ = [
    "MAX_ERROR_BYTES",
    "HealthServer",
    "HumanFormatter",
    "JsonFormatter",
    "Metrics",
    "Tracer",
    "TracingConfigurationError",
    "configure_logging",
    "configure_tracing",
    "current_log_context",
    "extract",
    "flush_tracing",
    "format_error",
    "get_metrics",
    "get_tracer",
    "heartbeat",
    "inject",
    "last_heartbeat_age",
    "log_context",
    "run_span",
    "service_call",
    "service_span",
    "shutdown_tracing",
    "span_for_node",
    "worker_ready_check",
]
