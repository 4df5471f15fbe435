"""OpenTelemetry traces of distributed runs: one trace per run, one span per node.

Off unless configured, and then free: until :func:`configure_tracing` turns
tracing on, :func:`get_tracer` returns a tracer whose spans are one shared
object that does nothing, :func:`inject` returns ``None`` (job messages get
no extra field) and ``opentelemetry`` is never imported. The ``otel`` extra
installs the SDK and the OTLP/HTTP exporter.

The shape of a run's trace::

    run <blueprint>                 flowcraft start (the client)
      node a                        the worker that ran a: its job carried run's context
        claim / commit / enqueue    service calls of that job
        node b                      b's job was enqueued by a, so it carries a's context

A job message carries the context of the span that enqueued it as an optional
``trace`` field, ``{"traceparent": "00-<trace id>-<span id>-01"}`` (W3C Trace
Context), and the worker that receives it opens the node's span as its child;
so every span of a run, on any worker, shares the run's trace id, and the
parent links follow the order the nodes were started in (a join's span is the
child of the predecessor whose commit started it). Messages without the field,
such as those the TypeScript library's client sends, start a new trace.

Configuration is the standard OpenTelemetry environment: ``OTEL_TRACES_EXPORTER``
(``console``, ``otlp``, ``none``; a comma-separated list sends to several;
unset means off — unlike the SDK's default of ``otlp``, so that installing the
extra changes nothing until asked), ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_PROTOCOL``
(``http/protobuf``, or ``grpc`` with ``opentelemetry-exporter-otlp-proto-grpc``
installed), ``OTEL_SERVICE_NAME`` (default ``flowcraft``), and the batch
processor's ``OTEL_BSP_*``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ..errors import FlowcraftError

TRACES_EXPORTER_ENV = "OTEL_TRACES_EXPORTER"
EXPORTERS = ("console", "otlp", "none")
_ATTRIBUTE_PREFIX = "flowcraft."


class TracingConfigurationError(FlowcraftError):
    """Tracing was asked for but cannot be set up (unknown exporter, extra missing)."""


class _NoopSpan:
    """The span of a tracer that is off: every method does nothing."""

    __slots__ = ()

    def __enter__(self) -> _NoopSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_outcome(self, outcome: str) -> None:
        pass

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def record_error(self, exc: BaseException) -> None:
        pass


_NOOP_SPAN = _NoopSpan()


class Tracer:
    """Opens flowcraft's spans. This base class is the tracer of tracing off."""

    enabled = False

    def run_span(self, run_id: str, blueprint_id: str) -> Any:
        """The root span of a run, opened by the client that starts it."""
        return _NOOP_SPAN

    def span_for_node(self, run_id: str, blueprint_id: str, node_id: str,
                      attempt: int | None = None, worker_id: str | None = None, *,
                      parent: Mapping[str, Any] | None = None) -> Any:
        """A node execution's span, the child of ``parent`` (a job's ``trace`` field) or,
        without one, of the current span. Use as a context manager; the value it gives has
        ``set_outcome(outcome)``, ``set_attribute(key, value)``, ``record_error(exc)``."""
        return _NOOP_SPAN

    def service_span(self, operation: str, **attributes: Any) -> Any:
        """A service call (``claim``, ``commit``, ``enqueue``, ...) of the current span."""
        return _NOOP_SPAN

    def annotate(self, **attributes: Any) -> None:
        """Set ``flowcraft.<key>`` attributes on the current span; ``error=message`` also
        sets its status to ERROR."""

    def inject(self) -> dict[str, str] | None:
        """The current span's context as a job's ``trace`` field (``None`` when off)."""
        return None

    def extract(self, field: Mapping[str, Any] | None) -> Any:
        """The OpenTelemetry context a job's ``trace`` field names (``None`` when off)."""
        return None


class _OtelSpan:
    """A started OpenTelemetry span, made current for the ``with`` block."""

    __slots__ = ("_attributes", "_name", "_parent", "_scope", "_span", "_tracer")

    def __init__(self, tracer: Any, name: str, parent: Any, attributes: dict[str, Any]) -> None:
        self._tracer, self._name, self._parent, self._attributes = (
            tracer, name, parent, attributes)
        self._span: Any = None
        self._scope: Any = None

    def __enter__(self) -> _OtelSpan:
        self._scope = self._tracer.start_as_current_span(
            self._name, context=self._parent, attributes=self._attributes)
        self._span = self._scope.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._scope.__exit__(*exc)

    def set_outcome(self, outcome: str) -> None:
        self._span.set_attribute(_ATTRIBUTE_PREFIX + "outcome", outcome)

    def set_attribute(self, key: str, value: Any) -> None:
        if value is not None:
            self._span.set_attribute(_ATTRIBUTE_PREFIX + key, value)

    def record_error(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.record_exception(exc)
        self._span.set_status(Status(StatusCode.ERROR, str(exc)[:200]))


class OtelTracer(Tracer):
    """The tracer of tracing on, over an OpenTelemetry ``TracerProvider``."""

    enabled = True

    def __init__(self, provider: Any, *, owns_provider: bool = False) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        self.provider = provider
        self.owns_provider = owns_provider
        self._trace = trace
        self._otel = provider.get_tracer("flowcraft")
        self._propagator = TraceContextTextMapPropagator()

    def run_span(self, run_id: str, blueprint_id: str) -> _OtelSpan:
        return _OtelSpan(self._otel, f"run {blueprint_id}", None, _attributes(
            run_id=run_id, blueprint_id=blueprint_id))

    def span_for_node(self, run_id: str, blueprint_id: str, node_id: str,
                      attempt: int | None = None, worker_id: str | None = None, *,
                      parent: Mapping[str, Any] | None = None) -> _OtelSpan:
        return _OtelSpan(self._otel, f"node {node_id}", self.extract(parent), _attributes(
            run_id=run_id, blueprint_id=blueprint_id, node_id=node_id, attempt=attempt,
            worker_id=worker_id))

    def service_span(self, operation: str, **attributes: Any) -> _OtelSpan:
        return _OtelSpan(self._otel, operation, None,
                         _attributes(operation=operation, **attributes))

    def annotate(self, **attributes: Any) -> None:
        span = self._trace.get_current_span()
        for key, value in _attributes(**attributes).items():
            span.set_attribute(key, value)
        if attributes.get("error") is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, str(attributes["error"])[:200]))

    def inject(self) -> dict[str, str] | None:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier or None

    def extract(self, field: Mapping[str, Any] | None) -> Any:
        """The OpenTelemetry context a job's ``trace`` field names (``None``: the current
        one). A malformed field is ignored: tracing never fails a job."""
        if not field or not isinstance(field.get("traceparent"), str):
            return None
        carrier = {key: value for key, value in field.items()
                   if key in ("traceparent", "tracestate") and isinstance(value, str)}
        context = self._propagator.extract(carrier)
        if not self._trace.get_current_span(context).get_span_context().is_valid:
            return None
        return context


def _attributes(**values: Any) -> dict[str, Any]:
    return {_ATTRIBUTE_PREFIX + key: value for key, value in values.items()
            if value is not None}


_tracer: Tracer = Tracer()


def get_tracer() -> Tracer:
    """The tracer configured for this process (one that does nothing until
    :func:`configure_tracing` turned tracing on)."""
    return _tracer


def span_for_node(run_id: str, blueprint_id: str, node_id: str, attempt: int | None = None,
                  worker_id: str | None = None, *,
                  parent: Mapping[str, Any] | None = None) -> Any:
    """:meth:`Tracer.span_for_node` of the configured tracer."""
    return _tracer.span_for_node(run_id, blueprint_id, node_id, attempt, worker_id,
                                 parent=parent)


def service_span(operation: str, **attributes: Any) -> Any:
    """:meth:`Tracer.service_span` of the configured tracer."""
    return _tracer.service_span(operation, **attributes)


def run_span(run_id: str, blueprint_id: str) -> Any:
    """:meth:`Tracer.run_span` of the configured tracer."""
    return _tracer.run_span(run_id, blueprint_id)


def inject() -> dict[str, str] | None:
    """:meth:`Tracer.inject` of the configured tracer: ``None`` when tracing is off."""
    return _tracer.inject()


def extract(field: Mapping[str, Any] | None) -> Any:
    """The OpenTelemetry context of a job's ``trace`` field (``None`` when off or absent)."""
    return _tracer.extract(field)


def configure_tracing(exporter: str | None = None, *, tracer_provider: Any = None,
                      console_stream: TextIO | None = None) -> bool:
    """Turn tracing on or off for this process; returns whether it is on.

    ``tracer_provider``: use this OpenTelemetry provider (an application's own, or a
    test's); otherwise build one for ``exporter`` (default ``$OTEL_TRACES_EXPORTER``).
    Raises :class:`TracingConfigurationError` naming the fix when the exporter is
    unknown or the ``otel`` extra is not installed. Call :func:`shutdown_tracing`
    before the process exits, so buffered spans are sent.
    """
    global _tracer
    shutdown_tracing()
    if tracer_provider is not None:
        _tracer = OtelTracer(tracer_provider)
        return True
    chosen = exporter if exporter is not None else os.environ.get(TRACES_EXPORTER_ENV, "")
    names = [name.strip().lower() for name in chosen.split(",") if name.strip()]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise TracingConfigurationError(
            f"unknown trace exporter {', '.join(unknown)!s} in {TRACES_EXPORTER_ENV}; "
            f"use {', '.join(EXPORTERS)} (comma-separated for several)")
    names = [name for name in names if name != "none"]
    if not names:
        return False
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise TracingConfigurationError(
            f"{TRACES_EXPORTER_ENV}={chosen} needs OpenTelemetry: install the otel extra "
            "(pip install 'flowcraft-py[otel]'), or unset the variable") from None
    resource = Resource.create(
        {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "flowcraft"})
    provider = TracerProvider(resource=resource)
    for name in names:
        if name == "console":
            span_exporter: Any = ConsoleSpanExporter(
                out=console_stream or sys.stdout,
                formatter=lambda span: span.to_json(indent=None) + os.linesep)
        else:
            span_exporter = _otlp_exporter()
        provider.add_span_processor(BatchSpanProcessor(span_exporter))
    _tracer = OtelTracer(provider, owns_provider=True)
    return True


def _otlp_exporter() -> Any:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        package = ("opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc"
                   else "opentelemetry-exporter-otlp-proto-http (the otel extra)")
        raise TracingConfigurationError(
            f"{TRACES_EXPORTER_ENV}=otlp over {protocol} needs {package}; install it") from None
    return OTLPSpanExporter()


def flush_tracing() -> None:
    """Send the spans buffered so far, keeping tracing on (end of a serverless invocation)."""
    if isinstance(_tracer, OtelTracer):
        _tracer.provider.force_flush()


def shutdown_tracing() -> None:
    """Send buffered spans and turn tracing off (a provider passed in is only flushed)."""
    global _tracer
    if isinstance(_tracer, OtelTracer):
        _tracer.provider.force_flush()
        if _tracer.owns_provider:
            _tracer.provider.shutdown()
    _tracer = Tracer()
