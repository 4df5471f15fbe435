"""``AzureJobQueue``: the job queue on Azure Queue Storage.

* messages are base64 of the job JSON (what Azure Functions' queue trigger
  expects); plain JSON text, as the TypeScript library's client sends it, is accepted too;
* receive: up to 32 messages per call (:meth:`AzureJobQueue.receive_once`, one
  GET); Queue Storage has no long polling, so an empty queue is polled with a
  backoff of up to ``max_poll_interval`` (from a quarter of it while the worker
  has jobs in hand), cut short by this worker's own sends;
  a stopping worker lets a GET that is on the wire finish and puts back
  (visibility 0) whatever it dequeued;
* a running job's message stays invisible through ``update_message`` (which
  issues a new pop receipt each time);
* durable sleep: the successor is sent with a visibility timeout (up to 7 days);
* poison messages (dequeued more than ``max_receive_count`` times, or
  unreadable) move to ``<queue>-poison``, created on first use.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from ...distributed.backend import QueueMessage
from ...distributed.job import JobPayload
from .._worker import InFlightReceives
from ._cosmos import with_throttling_retries

logger = logging.getLogger("flowcraft.azure")


class AzureJobQueue:
    """A :class:`~flowcraft.distributed.backend.JobQueue` on one queue (``queue_client`` is an
    ``azure.storage.queue.aio.QueueClient``); received messages stay invisible for
    ``visibility_seconds``. ``poison_queue_client`` defaults to ``<queue>-poison``."""

    max_delay_seconds: float = 7 * 24 * 3600.0
    max_visibility_seconds: float = 7 * 24 * 3600.0

    def __init__(self, queue_client: Any, *, visibility_seconds: float,
                 max_poll_interval: float = 1.0, poison_queue_client: Any = None) -> None:
        self.queue = queue_client
        self.visibility_seconds = visibility_seconds
        self.max_poll_interval = max_poll_interval
        self._poison_queue = poison_queue_client
        self._work_sent = asyncio.Event()
        self._receives = InFlightReceives(self._release)
        self.busy: Callable[[], bool] = lambda: False
        """Whether this worker has jobs in hand (set by its adapter): their sends wake its
        poller at once, so an empty queue is polled from a longer first pause."""

    async def send(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
        delay = max(0, min(round(delay_seconds), int(self.max_delay_seconds)))

        async def send(job: JobPayload) -> None:
            await with_throttling_retries(
                lambda: self.queue.send_message(job.to_base64(), visibility_timeout=delay or None),
                what="sending a job")

        await asyncio.gather(*(send(job) for job in jobs))
        if not delay:
            self._work_sent.set()  # our own poller need not wait out its backoff

    async def receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        deadline = time.monotonic() + wait_seconds
        # Busy, most new work comes from our own jobs' sends, which wake us: start the backoff
        # at a quarter of its ceiling instead of polling every 50 ms (others' messages still
        # wait at most max_poll_interval).
        pause = max(0.05, self.max_poll_interval / 4) if self.busy() else 0.05
        while True:
            self._work_sent.clear()
            messages = await self._receives.run(self.receive_once(max_messages))
            if messages or time.monotonic() >= deadline:
                return messages
            # Queue Storage has no long polling: back off, but wake up for our own sends.
            try:
                await asyncio.wait_for(self._work_sent.wait(),
                                       timeout=min(pause, max(0.0, deadline - time.monotonic())))
                pause = 0.05
            except TimeoutError:
                pause = min(pause * 2, self.max_poll_interval)

    async def receive_once(self, max_messages: int) -> list[QueueMessage]:
        """One GET: up to ``max_messages`` (at most 32) messages, or none."""
        pages = self.queue.receive_messages(
            messages_per_page=max(1, min(32, max_messages)),
            # Whole seconds, never 0 (a fractional lease must not leave messages visible).
            visibility_timeout=max(1, math.ceil(self.visibility_seconds)),
        ).by_page()
        received: list[QueueMessage] = []
        async for page in pages:
            async for message in page:
                received.append(QueueMessage(
                    body=message.content if message.content is not None else "",
                    message_id=message.id,
                    receive_count=int(message.dequeue_count or 1),
                    handle=message.pop_receipt,
                    sent_at=message.inserted_on.timestamp() if message.inserted_on else None,
                ))
            break  # one page: one request
        return received

    async def _release(self, messages: list[QueueMessage]) -> None:
        """Make messages visible again now (a stopping worker will not run them)."""
        await asyncio.gather(*(self.set_visibility(message, 0) for message in messages))

    async def close(self, receive_wait_seconds: float) -> None:
        """Let a receive that was on the wire finish and put back what it dequeued, before
        the client may close (a GET, never a long poll: its wait does not matter)."""
        await self._receives.drain(30.0)

    async def delete(self, messages: Sequence[QueueMessage]) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        for message in messages:
            try:
                await self.queue.delete_message(message.message_id, message.handle)
            except ResourceNotFoundError:
                # Its pop receipt is stale: another worker has the message now and will
                # find the node done.
                logger.info("message %s was already taken over; not deleted", message.message_id)

    async def set_visibility(self, message: QueueMessage, seconds: float) -> None:
        updated = await self.queue.update_message(
            message.message_id, message.handle,
            visibility_timeout=max(0, min(int(self.max_visibility_seconds), math.ceil(seconds))))
        message.handle = updated.pop_receipt  # every update issues a new pop receipt

    async def dead_letter(self, message: QueueMessage, reason: str) -> None:
        poison = await self._poison()
        body = message.body if isinstance(message.body, str) else message.body.decode(
            "utf-8", "replace")
        await poison.send_message(body)
        logger.error("message %s moved to %s: %s", message.message_id, poison.queue_name, reason)
        if message.handle is not None:  # None: a Functions trigger owns the message
            await self.delete([message])

    async def _poison(self) -> Any:
        if self._poison_queue is None:
            from azure.core.exceptions import ResourceExistsError
            from azure.storage.queue.aio import QueueClient

            name = f"{self.queue.queue_name}-poison"
            self._poison_queue = QueueClient(
                self.queue.url.rsplit("/", 1)[0], name, credential=self.queue.credential)
            try:
                await self._poison_queue.create_queue()
            except ResourceExistsError:
                pass
        return self._poison_queue
