"""Liveness, readiness, metrics and counts over HTTP, for Kubernetes probes, Prometheus
and programs.

:class:`HealthServer` is a few dozen lines on ``asyncio.start_server`` (no web
framework: four GET routes, each answered and the connection closed):

* ``/healthz`` (liveness): 200 while the worker's poll loop made progress —
  called :func:`heartbeat` — within ``stale_after_seconds``; 503 otherwise,
  so a worker whose loop hangs is restarted.
* ``/readyz`` (readiness): 200 when the worker's ``ready_check`` (an async
  callable that touches the queue and the stores) returns truthy within
  ``ready_timeout_seconds``; 503 with the reason otherwise.
* ``/metrics``: :meth:`Metrics.render`, the Prometheus text format.
* ``/stats``: the same counts as one JSON object, for a program that wants numbers
  rather than a scrape (``flowcraft demo`` reads each worker's before stopping it):
  :func:`metrics_stats` of the metrics, plus what the ``stats`` callable adds — the
  :class:`~flowcraft.worker.Worker` adds its id, its backend and ``serviceRequests``, the
  requests its service clients sent by ``service.Operation``.

The poll loop calls :func:`heartbeat` after every receive, empty or not; a
long-poll receive waits up to its wait time, so ``stale_after_seconds`` must
exceed it (the default, 60 s, is three 20 s polls).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .metrics import Metrics, get_metrics

logger = logging.getLogger("flowcraft.observability")

ReadyCheck = Callable[[], Awaitable[Any]]
StatsSource = Callable[[], Mapping[str, Any]]

_last_heartbeat: float | None = None


def heartbeat() -> None:
    """The worker loop made progress (called after every receive)."""
    global _last_heartbeat
    _last_heartbeat = time.monotonic()


def last_heartbeat_age() -> float | None:
    """Seconds since the last :func:`heartbeat` (``None``: there was none yet)."""
    return None if _last_heartbeat is None else time.monotonic() - _last_heartbeat


def worker_ready_check(adapter: Any) -> ReadyCheck:
    """A readiness check for a distributed worker: reads a status record and a context
    that do not exist (the stores answer) and the queue's attributes (the queue answers).
    Costs two or three small requests per probe."""

    async def check() -> bool:
        probe = "_flowcraft_readiness_probe"
        await adapter.backend.statuses.read(probe)
        await adapter.create_context(probe).load()
        if getattr(adapter, "sqs", None) is not None and getattr(adapter, "queue_url", None):
            await adapter.sqs.get_queue_attributes(QueueUrl=adapter.queue_url,
                                                   AttributeNames=["QueueArn"])
        elif hasattr(getattr(adapter, "queue", None), "get_queue_properties"):
            await adapter.queue.get_queue_properties()
        return True

    return check


def metrics_stats(metrics: Metrics) -> dict[str, Any]:
    """The counters of ``metrics`` as ``/stats`` shows them (histograms as count and sum)."""
    values = metrics.snapshot()
    return {
        "nodeExecutions": values["node_executions"],
        "nodeSeconds": values["node_duration_sum"],
        "messagesReceived": values["messages_received"],
        "messageRedeliveries": values["message_redeliveries"],
        "claimsLost": values["claims_lost"],
        "operations": values["service_requests"],
        "runsStarted": values["runs_started"],
        "runsFinished": values["runs_finished"],
    }


class HealthServer:
    """Serves ``/healthz``, ``/readyz``, ``/metrics`` and ``/stats`` on ``host:port`` (port
    0: any free one; :attr:`port` tells which after :meth:`start`).

    Args:
        ready_check: async callable; truthy (or ``None``) means ready, falsy or an
            exception means not ready. Without one, ready means alive.
        stale_after_seconds: ``/healthz`` fails when the last heartbeat is older; before
            the first heartbeat it counts from :meth:`start`.
        stats: returns what ``/stats`` shows besides :func:`metrics_stats` (its keys win);
            called on the event loop for each request, so it must be quick.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", *,
                 ready_check: ReadyCheck | None = None, stale_after_seconds: float = 60.0,
                 ready_timeout_seconds: float = 5.0, metrics: Metrics | None = None,
                 stats: StatsSource | None = None) -> None:
        self.host = host
        self.port = port
        self.ready_check = ready_check
        self.stats = stats
        self.stale_after_seconds = stale_after_seconds
        self.ready_timeout_seconds = ready_timeout_seconds
        self.metrics = metrics if metrics is not None else get_metrics()
        self._server: asyncio.Server | None = None
        self._started = time.monotonic()

    async def start(self) -> None:
        self._started = time.monotonic()
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("health server on http://%s:%d (/healthz, /readyz, /metrics, /stats)",
                    self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> HealthServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        age = last_heartbeat_age()
        if age is None or (_last_heartbeat or 0.0) < self._started:
            age = time.monotonic() - self._started
        alive = age <= self.stale_after_seconds
        return alive, {"status": "ok" if alive else "stalled",
                       "secondsSinceProgress": round(age, 3),
                       "staleAfterSeconds": self.stale_after_seconds}

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        alive, _ = self.liveness()
        if not alive:
            return False, {"status": "not ready", "reason": "the poll loop is stalled"}
        if self.ready_check is None:
            return True, {"status": "ready"}
        try:
            result = await asyncio.wait_for(self.ready_check(), self.ready_timeout_seconds)
        except TimeoutError:
            return False, {"status": "not ready", "reason":
                           f"readiness check took over {self.ready_timeout_seconds:g}s"}
        except Exception as exc:
            return False, {"status": "not ready", "reason": f"{type(exc).__name__}: {exc}"}
        if result is None or result:
            return True, {"status": "ready"}
        return False, {"status": "not ready", "reason": "the readiness check said no"}

    def current_stats(self) -> dict[str, Any]:
        """What ``/stats`` answers now."""
        return {**metrics_stats(self.metrics), **(self.stats() if self.stats else {})}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
            method, _, rest = request.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            status, content_type, body = await self._respond(method, path)
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that went away or sent garbage gets nothing
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        if path == "/healthz":
            ok, body = self.liveness()
        elif path == "/readyz":
            ok, body = await self.readiness()
        elif path == "/metrics":
            return ("200 OK", "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render().encode())
        elif path == "/stats":
            try:
                ok, body = True, self.current_stats()
            except Exception as exc:
                logger.exception("/stats failed")
                return ("500 Internal Server Error", "application/json", json.dumps(
                    {"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n")
        else:
            return ("404 Not Found", "text/plain",
                    b"not found; try /healthz, /readyz, /metrics or /stats\n")
        status = "200 OK" if ok else "503 Service Unavailable"
        return status, "application/json", json.dumps(body).encode() + b"\n"
