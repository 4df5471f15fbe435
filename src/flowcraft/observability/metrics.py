"""Process metrics of a worker, rendered in the Prometheus text format.

The job algorithm reports what happened through one :class:`Metrics` object
(:func:`get_metrics`, the process's); :meth:`Metrics.render` writes the text
that the health server's ``/metrics`` serves and Prometheus scrapes. Counters
and histograms only, each a few dict updates under a lock: cheap enough to
leave on. Every worker process counts its own; Prometheus sums them.

Series (all prefixed ``flowcraft_``):

* ``node_executions_total{outcome}``: nodes run (completed, failed, awaiting).
* ``node_duration_seconds``: how long a node's code ran (histogram).
* ``queue_lag_seconds``: a job message's age when a worker received it (histogram).
* ``messages_received_total``, ``message_redeliveries_total``: received messages, and
  those received before (a worker died, a lease was held elsewhere, ...).
* ``claims_lost_total``: results discarded because the node's lease was lost.
* ``service_requests_total{operation}``: service calls by the job algorithm.
* ``runs_started_total``, ``runs_finished_total{status}``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


class _Histogram:
    __slots__ = ("buckets", "count", "counts", "total")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.count += 1
        self.total += value

    def lines(self, name: str) -> list[str]:
        lines = []
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {_number(self.total)}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """Counters and histograms of one process; the engine calls the methods below."""

    def __init__(self, *, duration_buckets: Sequence[float] = DURATION_BUCKETS,
                 lag_buckets: Sequence[float] = LAG_BUCKETS) -> None:
        self._lock = threading.Lock()
        self._node_executions: dict[str, int] = {}
        self._node_duration = _Histogram(duration_buckets)
        self._queue_lag = _Histogram(lag_buckets)
        self._received = 0
        self._redeliveries = 0
        self._claims_lost = 0
        self._service_requests: dict[str, int] = {}
        self._runs_started = 0
        self._runs_finished: dict[str, int] = {}

    def node_finished(self, outcome: str, seconds: float) -> None:
        """A node's code ran for ``seconds`` and ended ``outcome`` (completed, failed, ...)."""
        with self._lock:
            self._node_executions[outcome] = self._node_executions.get(outcome, 0) + 1
            self._node_duration.observe(max(0.0, seconds))

    def message_received(self, age_seconds: float | None, redelivered: bool) -> None:
        """A job message arrived ``age_seconds`` after it was sent (``None``: unknown)."""
        with self._lock:
            self._received += 1
            if redelivered:
                self._redeliveries += 1
            if age_seconds is not None and math.isfinite(age_seconds):
                self._queue_lag.observe(max(0.0, age_seconds))

    def claim_lost(self) -> None:
        """A node's result was discarded: its lease had passed to another worker."""
        with self._lock:
            self._claims_lost += 1

    def service_request(self, operation: str) -> None:
        """The algorithm made one service call (``claim``, ``commit``, ``enqueue``, ...)."""
        with self._lock:
            self._service_requests[operation] = self._service_requests.get(operation, 0) + 1

    def run_started(self) -> None:
        with self._lock:
            self._runs_started += 1

    def run_finished(self, status: str) -> None:
        """A run was declared ``completed``, ``failed`` or ``cancelled`` by this process."""
        with self._lock:
            self._runs_finished[status] = self._runs_finished.get(status, 0) + 1

    def snapshot(self) -> dict[str, object]:
        """The values as plain data (for tests and status pages)."""
        with self._lock:
            return {
                "node_executions": dict(self._node_executions),
                "node_duration_count": self._node_duration.count,
                "node_duration_sum": self._node_duration.total,
                "queue_lag_count": self._queue_lag.count,
                "queue_lag_sum": self._queue_lag.total,
                "messages_received": self._received,
                "message_redeliveries": self._redeliveries,
                "claims_lost": self._claims_lost,
                "service_requests": dict(self._service_requests),
                "runs_started": self._runs_started,
                "runs_finished": dict(self._runs_finished),
            }

    def render(self) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        out: list[str] = []
        with self._lock:
            _counter(out, "flowcraft_node_executions_total", "Nodes run, by outcome.",
                     "outcome", self._node_executions)
            _histogram(out, "flowcraft_node_duration_seconds",
                       "Time a node's code ran.", self._node_duration)
            _histogram(out, "flowcraft_queue_lag_seconds",
                       "Age of a job message when a worker received it.", self._queue_lag)
            _counter(out, "flowcraft_messages_received_total", "Job messages received.",
                     None, self._received)
            _counter(out, "flowcraft_message_redeliveries_total",
                     "Job messages received more than once.", None, self._redeliveries)
            _counter(out, "flowcraft_claims_lost_total",
                     "Node results discarded because the lease was lost.", None,
                     self._claims_lost)
            _counter(out, "flowcraft_service_requests_total",
                     "Service calls of the job algorithm, by operation.", "operation",
                     self._service_requests)
            _counter(out, "flowcraft_runs_started_total", "Runs started.", None,
                     self._runs_started)
            _counter(out, "flowcraft_runs_finished_total", "Runs finished, by status.",
                     "status", self._runs_finished)
        return "\n".join(out) + "\n"


def _counter(out: list[str], name: str, help_text: str, label: str | None,
             values: dict[str, int] | int) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} counter")
    if isinstance(values, int):
        out.append(f"{name} {values}")
        return
    for key in sorted(values):
        out.append(f'{name}{{{label}="{escape_label(key)}"}} {values[key]}')


def _histogram(out: list[str], name: str, help_text: str, histogram: _Histogram) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} histogram")
    out.extend(histogram.lines(name))


def escape_label(value: str) -> str:
    """A label value as the text format writes it: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{value:.1f}"


_metrics = Metrics()


def get_metrics() -> Metrics:
    """This process's metrics."""
    return _metrics
