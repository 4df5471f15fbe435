"""The in-process backend: the distributed algorithm with an asyncio queue and dict stores.

It runs exactly the job algorithm (:mod:`flowcraft.distributed.algorithm`) —
the same code the AWS and Azure adapters run — over a
:class:`~flowcraft.distributed.backend.Backend` of :class:`InProcessQueue`
(visibility timeouts, redelivery, receive counts and delays, like SQS; seen
as a job queue through :class:`InProcessJobQueue`),
:class:`~flowcraft.distributed.context.InMemoryRunStore` and a dict of status
records (:class:`InProcessStatusStore`). Tests use it to prove the algorithm
without servers, including under duplicated, reordered and abandoned
messages; several adapters sharing one queue and store behave like several
workers.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Unpack

from ..core.options import RuntimeOptions
from ..events import EventBus
from .adapter import BaseDistributedAdapter
from .backend import Backend, QueueMessage
from .context import InMemoryRunStore
from .coordination import CoordinationStore, InMemoryCoordinationStore
from .job import JobPayload
from .options import WorkerOptions, check_option_names


@dataclass
class _Entry:
    message_id: str
    body: str
    visible_at: float
    receive_count: int = 0
    receipt: str | None = None


class InProcessQueue:
    """A queue with SQS semantics, in memory.

    ``duplicate_every_send`` delivers every message twice; ``shuffle`` hands
    out visible messages in random order. ``sent``/``received``/``deleted``
    count operations for cost assertions.
    """

    def __init__(self, *, duplicate_every_send: bool = False, shuffle: bool = False,
                 seed: int | None = None) -> None:
        self._entries: dict[str, _Entry] = {}
        # Every change happens on the event loop between awaits, so no lock is needed; a
        # fresh event per change wakes waiting receivers. (``wait_for`` around
        # ``Condition.wait`` can turn a cancellation into "Lock is not acquired".)
        self._changed = asyncio.Event()
        self.duplicate_every_send = duplicate_every_send
        self.shuffle = shuffle
        self._random = random.Random(seed)
        self._ids = itertools.count()
        self.calls: dict[str, int] = {}
        self.dead_letters: list[tuple[str, str]] = []

    def _count(self, operation: str) -> None:
        self.calls[operation] = self.calls.get(operation, 0) + 1

    async def send(self, bodies: Sequence[str], delay_seconds: float = 0) -> None:
        self._count("send")
        visible_at = time.monotonic() + delay_seconds
        for body in bodies:
            for _ in range(2 if self.duplicate_every_send else 1):
                message_id = f"m{next(self._ids)}"
                self._entries[message_id] = _Entry(message_id, body, visible_at)
        self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def receive(self, max_messages: int, wait_seconds: float,
                      visibility_seconds: float) -> list[QueueMessage]:
        self._count("receive")
        deadline = time.monotonic() + wait_seconds
        while True:
            now = time.monotonic()
            visible = [e for e in self._entries.values() if e.visible_at <= now]
            if visible:
                if self.shuffle:
                    self._random.shuffle(visible)
                taken = visible[:max_messages]
                result = []
                for entry in taken:
                    entry.receive_count += 1
                    entry.receipt = uuid.uuid4().hex
                    entry.visible_at = now + visibility_seconds
                    result.append(QueueMessage(entry.body, entry.message_id,
                                               entry.receive_count, entry.receipt))
                return result
            remaining = deadline - now
            if remaining <= 0:
                return []
            upcoming = [e.visible_at - now for e in self._entries.values()]
            timeout = min([remaining, *[u for u in upcoming if u > 0]])
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=max(timeout, 0.001))
            except TimeoutError:
                pass

    def _current(self, message: QueueMessage) -> _Entry | None:
        entry = self._entries.get(message.message_id)
        return entry if entry is not None and entry.receipt == message.handle else None

    async def delete(self, messages: Sequence[QueueMessage]) -> None:
        self._count("delete")
        for message in messages:
            if self._current(message) is not None:
                del self._entries[message.message_id]

    async def set_visibility(self, message: QueueMessage, seconds: float) -> None:
        self._count("visibility")
        entry = self._current(message)
        if entry is not None:
            entry.visible_at = time.monotonic() + seconds
            self._notify()

    def __len__(self) -> int:
        return len(self._entries)

    def bodies(self) -> list[str]:
        return [entry.body for entry in self._entries.values()]


class InProcessJobQueue:
    """An :class:`InProcessQueue` as a job queue: jobs sent in batches of ten, received
    messages invisible for ``visibility_seconds``, poison messages listed in the queue's
    ``dead_letters``."""

    max_delay_seconds: float = 900.0

    def __init__(self, queue: InProcessQueue, *, visibility_seconds: float) -> None:
        self.queue = queue
        self.visibility_seconds = visibility_seconds

    async def send(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
        for start in range(0, len(jobs), 10):
            await self.queue.send([job.to_json() for job in jobs[start:start + 10]],
                                  delay_seconds)

    async def receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        return await self.queue.receive(max_messages, wait_seconds, self.visibility_seconds)

    async def delete(self, messages: Sequence[QueueMessage]) -> None:
        await self.queue.delete(messages)

    async def set_visibility(self, message: QueueMessage, seconds: float) -> None:
        await self.queue.set_visibility(message, seconds)

    async def dead_letter(self, message: QueueMessage, reason: str) -> None:
        self.queue.dead_letters.append((message.message_id, reason))
        await self.queue.delete([message])

    async def close(self, receive_wait_seconds: float) -> None:
        """Nothing to settle: deletes are immediate and a receive cannot outlive its poll."""


class InProcessStatusStore:
    """Status records in a dict (run id to record); ``writes`` counts the writes."""

    def __init__(self, records: dict[str, dict[str, Any]] | None = None) -> None:
        self.records = records if records is not None else {}
        self.writes = 0

    async def write(self, run_id: str, fields: Mapping[str, Any], *,
                    only_if_running: bool) -> bool:
        self.writes += 1
        current = self.records.get(run_id)
        if only_if_running and current is not None and current.get("status") != "running":
            return False
        record = dict(current or {"runId": run_id})
        record.update(fields)
        self.records[run_id] = record
        return True

    async def read(self, run_id: str) -> dict[str, Any] | None:
        record = self.records.get(run_id)
        return dict(record) if record is not None else None

    async def scan(self, status: str) -> AsyncIterator[dict[str, Any]]:
        for record in list(self.records.values()):
            if record.get("status") == status:
                yield dict(record)


class InProcessAdapter(BaseDistributedAdapter):
    """A worker over in-process services; pass the same ``queue``, ``store``, ``statuses``
    and ``coordination_store`` to several adapters to get several cooperating workers."""

    def __init__(
        self,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore | None = None,
        *,
        queue: InProcessQueue | None = None,
        store: InMemoryRunStore | None = None,
        statuses: dict[str, dict[str, Any]] | None = None,
        event_bus: EventBus | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        check_option_names("InProcessAdapter", options,
                           extra=("queue", "store", "statuses", "event_bus"))
        options.setdefault("poll_wait_seconds", 0.2)
        self.queue = queue if queue is not None else InProcessQueue()
        self.store = store if store is not None else InMemoryRunStore()
        self.statuses = statuses if statuses is not None else {}
        self._status_store = InProcessStatusStore(self.statuses)
        super().__init__(runtime_options, coordination_store or InMemoryCoordinationStore(),
                         event_bus, **options)

    def create_backend(self) -> Backend:
        return Backend(InProcessJobQueue(self.queue, visibility_seconds=self.lease_seconds),
                       self.store, self._status_store)

    @property
    def status_writes(self) -> int:
        """Status records written by this worker (each write, whether it applied or not)."""
        return self._status_store.writes
