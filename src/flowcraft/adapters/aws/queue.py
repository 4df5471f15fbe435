"""``SqsJobQueue``: the job queue on Amazon SQS.

* receive: long polling, up to 10 messages per call, with
  ``ApproximateReceiveCount`` so poison messages are recognised; a stopping
  worker waits for its open long poll (the server would keep it going anyway)
  and puts back whatever it returns (``ChangeMessageVisibilityBatch`` to 0);
* acknowledge: ``DeleteMessageBatch``, gathering the deletes of jobs that
  finish close together (for ``delete_batch_seconds``; :meth:`SqsJobQueue.close`
  sends what is still gathered);
* keep a running job's message invisible with ``ChangeMessageVisibility``;
* send: ``SendMessageBatch`` in chunks of 10; ``DelaySeconds`` for durable
  sleeps (SQS allows at most 15 minutes; longer sleeps are re-delayed);
* poison messages go to the queue's dead-letter queue when its
  ``RedrivePolicy`` names one, and are deleted otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...distributed.backend import QueueMessage
from ...distributed.job import JobPayload
from .._worker import InFlightReceives

logger = logging.getLogger("flowcraft.aws")


class SqsJobQueue:
    """A :class:`~flowcraft.distributed.backend.JobQueue` on one SQS queue (``sqs_client`` is
    an aiobotocore client); received messages stay invisible for ``visibility_seconds``."""

    max_delay_seconds: float = 900.0
    max_visibility_seconds: float = 43_200.0

    def __init__(self, sqs_client: Any, queue_url: str, *, visibility_seconds: float) -> None:
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.visibility_seconds = visibility_seconds
        # Up to 2 s, a tenth of the visibility timeout at most: on a busy worker ten jobs
        # finish in that time, so one DeleteMessageBatch acknowledges them all.
        self.delete_batch_seconds = min(2.0, visibility_seconds / 10)
        self._pending_deletes: list[QueueMessage] = []
        self._delete_flush: asyncio.Task[None] | None = None
        self._dead_letter_url: str | bool | None = False  # False: not looked up yet
        self._dead_letter_lock: asyncio.Lock | None = None
        self._receives = InFlightReceives(self._release)

    async def send(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
        delay = max(0, min(round(delay_seconds), int(self.max_delay_seconds)))
        for start in range(0, len(jobs), 10):
            chunk = jobs[start:start + 10]
            entries = [{"Id": str(i), "MessageBody": job.to_json(), "DelaySeconds": delay}
                       for i, job in enumerate(chunk)]
            for _ in range(3):
                response = await self.sqs.send_message_batch(QueueUrl=self.queue_url,
                                                             Entries=entries)
                failed = {f["Id"] for f in response.get("Failed", [])}
                if not failed:
                    break
                entries = [e for e in entries if e["Id"] in failed]
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError(f"SQS refused {len(entries)} job(s) three times: "
                                   f"{response.get('Failed')}")

    async def receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        return await self._receives.run(self._receive_messages(max_messages, wait_seconds))

    async def _receive_messages(self, max_messages: int,
                                wait_seconds: float) -> list[QueueMessage]:
        response = await self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=max(0, min(20, int(wait_seconds))),
            # Whole seconds, never 0 (a fractional lease must not make messages visible at once).
            VisibilityTimeout=max(1, min(43_200, math.ceil(self.visibility_seconds))),
            MessageSystemAttributeNames=["ApproximateReceiveCount", "SentTimestamp"],
        )
        return [
            QueueMessage(
                body=message["Body"],
                message_id=message["MessageId"],
                receive_count=int(message.get("Attributes", {}).get("ApproximateReceiveCount",
                                                                    1)),
                handle=message["ReceiptHandle"],
                sent_at=_sent_at(message),
            )
            for message in response.get("Messages", [])
        ]

    async def delete(self, messages: Sequence[QueueMessage]) -> None:
        """Deletes are gathered for a moment and sent with DeleteMessageBatch: a full batch at
        once, the rest when the oldest has waited ``delete_batch_seconds``."""
        self._pending_deletes.extend(messages)
        while len(self._pending_deletes) >= 10:
            batch, self._pending_deletes = self._pending_deletes[:10], self._pending_deletes[10:]
            await self._delete_batch(batch)
        if self._pending_deletes and (self._delete_flush is None or self._delete_flush.done()):
            self._delete_flush = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        # Jobs finish one by one, rarely within a few ms of each other: gather deletes for a
        # moment (far inside the visibility timeout; a message redelivered before its
        # delete lands finds its node done). Deletes that arrive while a batch is on the
        # wire wait for the next round instead of going out one by one behind it.
        while self._pending_deletes:
            await asyncio.sleep(self.delete_batch_seconds)
            await self._flush_deletes()

    async def _flush_deletes(self) -> None:
        pending, self._pending_deletes = self._pending_deletes, []
        for start in range(0, len(pending), 10):
            await self._delete_batch(pending[start:start + 10])

    async def _delete_batch(self, batch: Sequence[QueueMessage]) -> None:
        entries = [{"Id": str(i), "ReceiptHandle": m.handle} for i, m in enumerate(batch)]
        try:
            response = await self.sqs.delete_message_batch(QueueUrl=self.queue_url,
                                                           Entries=entries)
        except Exception as exc:
            logger.warning("deleting %d message(s) failed (they will be redelivered and "
                           "recognised as done): %s", len(batch), exc)
            return
        for failure in response.get("Failed", []):
            logger.warning("message delete failed: %s", failure)

    async def set_visibility(self, message: QueueMessage, seconds: float) -> None:
        await self.sqs.change_message_visibility(
            QueueUrl=self.queue_url, ReceiptHandle=message.handle,
            VisibilityTimeout=max(0, min(43_200, math.ceil(seconds))),
        )

    async def dead_letter(self, message: QueueMessage, reason: str) -> None:
        url = await self._dead_letter_queue()
        if url:
            await self.sqs.send_message(
                QueueUrl=url, MessageBody=message.body if isinstance(message.body, str)
                else message.body.decode("utf-8", "replace"),
                MessageAttributes={"flowcraftError": {"DataType": "String",
                                                      "StringValue": reason[:1000]}},
            )
        if message.handle is not None:  # None: a Lambda trigger owns the message
            await self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message.handle)

    async def _dead_letter_queue(self) -> str | None:
        """The URL of the queue's dead-letter queue (from its ``RedrivePolicy``), looked up
        once. Poison messages of one batch arrive together: they wait for one lookup instead
        of seeing "not looked up yet" as "no dead-letter queue". A failed lookup is retried
        next time."""
        if self._dead_letter_lock is None:
            self._dead_letter_lock = asyncio.Lock()
        async with self._dead_letter_lock:
            if self._dead_letter_url is False:
                try:
                    attributes = await self.sqs.get_queue_attributes(
                        QueueUrl=self.queue_url, AttributeNames=["RedrivePolicy"])
                    policy = attributes.get("Attributes", {}).get("RedrivePolicy")
                    url = None
                    if policy:
                        arn = json.loads(policy)["deadLetterTargetArn"]
                        parts = arn.split(":")
                        lookup = {"QueueName": parts[-1]}
                        if len(parts) >= 6 and parts[4]:
                            lookup["QueueOwnerAWSAccountId"] = parts[4]
                        url = (await self.sqs.get_queue_url(**lookup))["QueueUrl"]
                    self._dead_letter_url = url
                except Exception as exc:
                    logger.warning("could not look up the dead-letter queue of %s (poison "
                                   "messages are deleted meanwhile): %s", self.queue_url, exc)
                    return None
        return self._dead_letter_url if isinstance(self._dead_letter_url, str) else None

    async def _release(self, messages: list[QueueMessage]) -> None:
        """Make messages visible again now (a stopping worker will not run them)."""
        for start in range(0, len(messages), 10):
            entries = [{"Id": str(i), "ReceiptHandle": m.handle, "VisibilityTimeout": 0}
                       for i, m in enumerate(messages[start:start + 10])]
            response = await self.sqs.change_message_visibility_batch(
                QueueUrl=self.queue_url, Entries=entries)
            for failure in response.get("Failed", []):
                logger.warning("putting back a message failed: %s", failure)

    async def close(self, receive_wait_seconds: float) -> None:
        """Send the gathered deletes; then wait for the long poll that was open (at most its
        wait) and put back what it received, before the client may close."""
        await self._flush_deletes()
        await self._receives.drain(receive_wait_seconds + 10)


def _sent_at(message: Mapping[str, Any]) -> float | None:
    """When SQS accepted the message (epoch seconds), for the queue-lag metric."""
    sent = message.get("Attributes", {}).get("SentTimestamp")
    return int(sent) / 1000.0 if sent and str(sent).isdigit() else None
