"""The backend contract: what a queue and a database must offer the distributed engine.

A worker is built by composition. A :class:`Backend` bundles three parts, each a
:class:`~typing.Protocol` with public, typed methods:

:class:`JobQueue`
    At-least-once delivery of job messages: ``send`` (batched where the service
    allows, with a delay up to ``max_delay_seconds`` for durable sleeps),
    ``receive`` (a long poll where the service has one; received messages stay
    invisible for the worker's lease), ``delete``, ``set_visibility`` (0: visible
    again now), ``dead_letter`` (move a poison message aside), and ``close``,
    which a stopping worker awaits: it sends acknowledgements still gathered for
    a batch and puts back what receives abandoned by the stopped poll loop
    return (a service does not cancel a receive on the wire).
:class:`RunStore`
    ``context(run_id)``: the run's :class:`~flowcraft.distributed.context.DistributedContext`,
    one item per run with conditional claim / commit / renew / release / apply.
:class:`StatusStore`
    One status record per run (``status``, ``lastUpdated``, ``blueprintId``, ...):
    ``write`` (optionally only while the run is ``running`` — how a run is
    declared finished exactly once), ``read``, and ``scan`` by status, every page
    (what a reconciler without an index and the run view of a backend without
    one read). :class:`IndexedStatusStore` adds ``list_statuses``, a page through
    an index, newest update first: the cloud backends have one.

The job algorithm (:mod:`.algorithm`), the polling loop (:mod:`.polling`) and
the client side (:mod:`.runs`) use nothing else, so the in-process backend, AWS
(SQS + DynamoDB) and Azure (Queue Storage + Cosmos DB) run the same code. The
status values and the timestamp helpers every part shares are defined here too.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from ..errors import FlowcraftError
from ..runview import parse_time
from .context import DistributedContext
from .job import JobPayload

FINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
RESTING_STATUSES = FINAL_STATUSES | {"awaiting"}


def now_iso() -> str:
    """Now, as the ``lastUpdated`` of a status record (ISO-8601, milliseconds, ``Z``)."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_timestamp(value: Any) -> float | None:
    """``lastUpdated`` as epoch seconds: numbers (seconds or milliseconds) as they are,
    ISO-8601 strings parsed (what the TypeScript library's client writes)."""
    return parse_time(value)


# -- listing runs through a status index ----------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    status: str
    blueprint_id: str | None
    updated_at: datetime | None
    record: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The status record as stored (start time, error, ...), for views that show more."""


@dataclass(frozen=True)
class RunPage:
    items: list[RunSummary]
    next_cursor: str | None


def iso_datetime(value: Any) -> datetime | None:
    """An ISO-8601 ``lastUpdated`` (as the status records hold it) as a datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def encode_cursor(value: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor.encode()))
    except (ValueError, TypeError):
        raise FlowcraftError(f"cursor {cursor[:40]!r} is not one list_runs returned; pass the "
                             "next_cursor of the previous page unchanged") from None
    if not isinstance(value, dict):
        raise FlowcraftError("cursor is not one list_runs returned")
    return value


@dataclass(slots=True)
class QueueMessage:
    """A received message, as the polling loop sees it."""

    body: str | bytes
    message_id: str
    receive_count: int = 1
    handle: Any = None
    sent_at: float | None = None
    """When the message was sent (epoch seconds), where the queue tells: for queue lag."""


class JobQueue(Protocol):
    """The job queue (see the module docstring)."""

    max_delay_seconds: float
    """The longest delay the queue accepts on a message (longer sleeps are chained)."""

    async def send(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
        """Enqueue jobs (batched where the service allows); ``delay_seconds`` is at most
        ``max_delay_seconds``."""
        ...

    async def receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        """Wait up to ``wait_seconds`` for up to ``max_messages`` messages, invisible to
        other receivers for the worker's lease."""
        ...

    async def delete(self, messages: Sequence[QueueMessage]) -> None:
        """Acknowledge (remove) messages."""
        ...

    async def set_visibility(self, message: QueueMessage, seconds: float) -> None:
        """Keep a message invisible for ``seconds`` more (0: visible again now)."""
        ...

    async def dead_letter(self, message: QueueMessage, reason: str) -> None:
        """Move a poison message aside (or remove it where the queue has no such place).
        A message with ``handle=None`` is owned by a platform's trigger: not deleted."""
        ...

    async def close(self, receive_wait_seconds: float) -> None:
        """Settle what the queue still holds for a stopping worker: acknowledgements
        gathered for a batch, and receives its stopped poll loop abandoned (waited for,
        their messages made visible again). ``receive_wait_seconds`` is the longest wait
        the worker's receives asked for."""
        ...


class RunStore(Protocol):
    """Where runs' contexts are stored."""

    def context(self, run_id: str) -> DistributedContext:
        """The stored context of one run (no service call until it is used)."""
        ...


class StatusStore(Protocol):
    """One status record per run."""

    async def write(self, run_id: str, fields: Mapping[str, Any], *,
                    only_if_running: bool) -> bool:
        """Create or update a status record; with ``only_if_running`` only while its status
        is ``running`` (or the record is absent). Returns whether it was written."""
        ...

    async def read(self, run_id: str) -> dict[str, Any] | None:
        """The status record of a run, or ``None``."""
        ...

    def scan(self, status: str) -> AsyncIterator[dict[str, Any]]:
        """Every status record with the given ``status``, across all pages."""
        ...


@runtime_checkable
class IndexedStatusStore(StatusStore, Protocol):
    """A status store with an index by status and ``lastUpdated``."""

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> RunPage:
        """A page of runs with one of ``statuses`` (newest update first) and the cursor of
        the next page."""
        ...


@dataclass
class Backend:
    """The parts a worker runs on. The algorithm, the polling loop and the client side
    share one ``Backend`` and look its parts up on every use, so a part may be replaced
    (wrapped) after the worker was built."""

    queue: JobQueue
    runs: RunStore
    statuses: StatusStore
