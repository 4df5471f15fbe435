"""``SqsAdapter``: workers that take jobs from Amazon SQS and keep state in DynamoDB.

The job algorithm is :class:`~flowcraft.distributed.adapter.BaseDistributedAdapter`'s;
this module only speaks SQS and DynamoDB:

* receive: long polling, up to 10 messages per call, with
  ``ApproximateReceiveCount`` so poison messages are recognised; a stopping
  worker waits for its open long poll (the server would keep it going anyway)
  and puts back whatever it returns (``ChangeMessageVisibilityBatch`` to 0);
* acknowledge: ``DeleteMessageBatch``, gathering the deletes of jobs that
  finish close together;
* keep a running job's message invisible with ``ChangeMessageVisibility``;
* send: ``SendMessageBatch`` in chunks of 10; ``DelaySeconds`` for durable
  sleeps (SQS allows at most 15 minutes; longer sleeps are re-delayed);
* poison messages go to the queue's dead-letter queue when its
  ``RedrivePolicy`` names one, and are deleted otherwise;
* status records: one item per run in the status table (``runId``,
  ``status``, ``lastUpdated``, ``finalStatus``, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Unpack

from ...core.options import RuntimeOptions
from ...distributed.adapter import BaseDistributedAdapter, QueueMessage
from ...distributed.coordination import CoordinationStore
from ...distributed.job import JobPayload
from ...distributed.options import WorkerOptions, check_option_names
from ...events import EventBus
from .._worker import InFlightReceives, check_worker_options
from ._dynamo import Expression, from_item
from .context import DynamoDbContext
from .provision import CONTEXT_TTL_ATTRIBUTE, STATUS_INDEX

logger = logging.getLogger("flowcraft.aws")


class SqsAdapter(BaseDistributedAdapter):
    """A worker (and client) over SQS + DynamoDB.

    ``sqs_client`` and ``dynamodb_client`` are aiobotocore clients; see
    ``docs/aws.md`` for a complete worker. Other keyword arguments are the
    :class:`~flowcraft.distributed.options.WorkerOptions` (``concurrency``,
    ``lease_seconds``, ...); an unknown one is a ``TypeError``.
    """

    max_delay_seconds = 900.0
    max_visibility_seconds = 43_200.0
    retention_seconds: float | None = 30 * 24 * 3600.0
    """How long a finished run's context and status items are kept (DynamoDB TTL on the
    status item's ``ttl`` and the context item's ``_flowcraft.ttl``); ``None`` keeps them."""

    def __init__(
        self,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore,
        sqs_client: Any,
        dynamodb_client: Any,
        queue_url: str,
        context_table_name: str = "flowcraft-contexts",
        status_table_name: str = "flowcraft-statuses",
        *,
        event_bus: EventBus | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        check_option_names("SqsAdapter", options, extra=("event_bus",))
        check_worker_options(options, max_lease_seconds=self.max_visibility_seconds)
        super().__init__(runtime_options, coordination_store, event_bus, **options)
        if not queue_url:
            raise ValueError("SqsAdapter needs a queue_url (set SQS_QUEUE_URL)")
        self.sqs = sqs_client
        self.dynamodb = dynamodb_client
        self.queue_url = queue_url
        self.context_table_name = context_table_name
        self.status_table_name = status_table_name
        self._pending_deletes: list[QueueMessage] = []
        self.delete_batch_seconds = min(0.5, self.lease_seconds / 10)
        self._delete_flush: asyncio.Task[None] | None = None
        self._dead_letter_url: str | bool | None = False  # False: not looked up yet
        self._dead_letter_lock: asyncio.Lock | None = None
        self._receives = InFlightReceives(self._release)

    def create_context(self, run_id: str) -> DynamoDbContext:
        return DynamoDbContext(run_id, client=self.dynamodb, table_name=self.context_table_name)

    # -- queue -----------------------------------------------------------------------------

    async def _send_jobs(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
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

    async def _receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        return await self._receives.run(self._receive_messages(max_messages, wait_seconds))

    async def _receive_messages(self, max_messages: int,
                                wait_seconds: float) -> list[QueueMessage]:
        response = await self.sqs.receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max(1, min(10, max_messages)),
            WaitTimeSeconds=max(0, min(20, int(wait_seconds))),
            # Whole seconds, never 0 (a fractional lease must not make messages visible at once).
            VisibilityTimeout=max(1, min(43_200, math.ceil(self.lease_seconds))),
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

    async def _delete(self, messages: Sequence[QueueMessage]) -> None:
        """Deletes are gathered for a moment and sent with DeleteMessageBatch."""
        self._pending_deletes.extend(messages)
        if len(self._pending_deletes) >= 10:
            await self._flush_deletes()
        elif self._delete_flush is None or self._delete_flush.done():
            self._delete_flush = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        # Jobs finish one by one, rarely within a few ms of each other: gather deletes for
        # half a second (far inside the visibility timeout; a message redelivered before its
        # delete lands finds its node done).
        await asyncio.sleep(self.delete_batch_seconds)
        await self._flush_deletes()

    async def _flush_deletes(self) -> None:
        while self._pending_deletes:
            batch, self._pending_deletes = self._pending_deletes[:10], self._pending_deletes[10:]
            entries = [{"Id": str(i), "ReceiptHandle": m.handle} for i, m in enumerate(batch)]
            try:
                response = await self.sqs.delete_message_batch(QueueUrl=self.queue_url,
                                                               Entries=entries)
            except Exception as exc:
                logger.warning("deleting %d message(s) failed (they will be redelivered and "
                               "recognised as done): %s", len(batch), exc)
                continue
            for failure in response.get("Failed", []):
                logger.warning("message delete failed: %s", failure)

    async def _set_visibility(self, message: QueueMessage, seconds: float) -> None:
        await self.sqs.change_message_visibility(
            QueueUrl=self.queue_url, ReceiptHandle=message.handle,
            VisibilityTimeout=max(0, min(43_200, math.ceil(seconds))),
        )

    async def _dead_letter(self, message: QueueMessage, reason: str) -> None:
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

    async def stop(self, timeout_seconds: float | None = None) -> None:
        """Stop as the base class does; then wait for the long poll that was open (at most
        its wait) and put back what it received, before the clients may close."""
        await super().stop(timeout_seconds)
        await self._flush_deletes()
        await self._receives.drain(self.poll_wait_seconds + 10)

    # -- status records --------------------------------------------------------------------

    async def _write_status(self, run_id: str, fields: Mapping[str, Any], *,
                            only_if_running: bool) -> bool:
        expire = self._expiry(fields)
        if expire is not None:
            fields = {**fields, "ttl": expire}
        expression = Expression()
        sets = ", ".join(f"{expression.name(k)} = {expression.value(v)}"
                         for k, v in fields.items() if k != "runId")
        arguments: dict[str, Any] = {
            "TableName": self.status_table_name, "Key": {"runId": {"S": run_id}},
            "UpdateExpression": f"SET {sets}",
        }
        if only_if_running:
            arguments["ConditionExpression"] = (
                f"attribute_not_exists({expression.name('runId')}) OR "
                f"{expression.name('status')} = {expression.value('running')}")
        arguments.update(expression.arguments())
        try:
            await self.dynamodb.update_item(**arguments)
        except self.dynamodb.exceptions.ConditionalCheckFailedException:
            return False
        if expire is not None:
            # The context expires with its status record (one more write per finished run).
            with contextlib.suppress(self.dynamodb.exceptions.ConditionalCheckFailedException):
                await self.dynamodb.update_item(
                    TableName=self.context_table_name, Key={"runId": {"S": run_id}},
                    UpdateExpression="SET #ttl = :ttl",
                    ConditionExpression="attribute_exists(runId)",
                    ExpressionAttributeNames={"#ttl": CONTEXT_TTL_ATTRIBUTE},
                    ExpressionAttributeValues={":ttl": {"N": str(expire)}})
        return True

    def _expiry(self, fields: Mapping[str, Any]) -> int | None:
        if self.retention_seconds is None or fields.get("status") not in (
                "completed", "failed", "cancelled"):
            return None
        return int(time.time() + self.retention_seconds)

    async def _read_status(self, run_id: str) -> dict[str, Any] | None:
        response = await self.dynamodb.get_item(TableName=self.status_table_name,
                                                Key={"runId": {"S": run_id}},
                                                ConsistentRead=True)
        item = response.get("Item")
        return from_item(item) if item else None

    def _scan_statuses(self, status: str) -> AsyncIterator[dict[str, Any]]:
        return scan_status_table(self.dynamodb, self.status_table_name, status)

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> Any:
        """A :class:`~flowcraft.client.RunPage` through the status index (never a scan)."""
        from ...client import RunPage, RunSummary, _timestamp

        items, next_cursor = await query_status_index(
            self.dynamodb, self.status_table_name, statuses, blueprint_id=blueprint_id,
            since=since, limit=limit, cursor=cursor)
        return RunPage([RunSummary(str(i["runId"]), str(i.get("status")), i.get("blueprintId"),
                                   _timestamp(i.get("lastUpdated")), i) for i in items],
                       next_cursor)


async def scan_status_table(client: Any, table_name: str,
                            status: str | None = "running") -> AsyncIterator[dict[str, Any]]:
    """Every status item (with ``status``, if given), following ``LastEvaluatedKey``."""
    arguments: dict[str, Any] = {"TableName": table_name}
    if status is not None:
        expression = Expression()
        arguments["FilterExpression"] = (
            f"{expression.name('status')} = {expression.value(status)}")
        arguments.update(expression.arguments())
    while True:
        response = await client.scan(**arguments)
        for item in response.get("Items", []):
            yield from_item(item)
        last = response.get("LastEvaluatedKey")
        if not last:
            return
        arguments["ExclusiveStartKey"] = last


def _sent_at(message: Mapping[str, Any]) -> float | None:
    """When SQS accepted the message (epoch seconds), for the queue-lag metric."""
    sent = message.get("Attributes", {}).get("SentTimestamp")
    return int(sent) / 1000.0 if sent and str(sent).isdigit() else None


async def query_status_index(client: Any, table_name: str, statuses: Sequence[str], *,
                             blueprint_id: str | None = None, since: str | None = None,
                             before: str | None = None, limit: int = 50,
                             cursor: str | None = None) -> tuple[list[dict[str, Any]],
                                                                 str | None]:
    """A page of status items through the status index (newest ``lastUpdated`` first within
    each status, the statuses one after another) and the cursor of the next page."""
    from ...client import decode_cursor, encode_cursor

    position = decode_cursor(cursor) if cursor else {"s": 0}
    index, start_key = int(position.get("s", 0)), position.get("k")
    items: list[dict[str, Any]] = []
    while index < len(statuses) and len(items) < limit:
        expression = Expression()
        condition = f"{expression.name('status')} = {expression.value(statuses[index])}"
        updated = expression.name("lastUpdated") if since or before else ""
        if since and before:
            condition += (f" AND {updated} BETWEEN {expression.value(since)} AND "
                          f"{expression.value(before)}")
        elif since:
            condition += f" AND {updated} >= {expression.value(since)}"
        elif before:
            condition += f" AND {updated} < {expression.value(before)}"
        arguments: dict[str, Any] = {
            "TableName": table_name, "IndexName": STATUS_INDEX,
            "KeyConditionExpression": condition, "ScanIndexForward": False,
            "Limit": limit - len(items),
        }
        if blueprint_id:
            arguments["FilterExpression"] = (
                f"{expression.name('blueprintId')} = {expression.value(blueprint_id)}")
        arguments.update(expression.arguments())
        if start_key:
            arguments["ExclusiveStartKey"] = start_key
        response = await client.query(**arguments)
        items += [from_item(item) for item in response.get("Items", [])]
        start_key = response.get("LastEvaluatedKey")
        if not start_key:
            index += 1
    if index >= len(statuses):
        return items, None
    return items, encode_cursor({"s": index, **({"k": start_key} if start_key else {})})
