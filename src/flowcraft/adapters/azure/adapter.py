"""``AzureQueueAdapter``: workers that take jobs from Azure Queue Storage, state in Cosmos DB.

The job algorithm is :class:`~flowcraft.distributed.adapter.BaseDistributedAdapter`'s;
this module only speaks the two services:

* messages are base64 of the job JSON (what Azure Functions' queue trigger
  expects); plain JSON text, as the TypeScript library's client sends it, is accepted too;
* receive: up to 32 messages per call; Queue Storage has no long polling,
  so an empty queue is polled with a backoff of up to ``max_poll_interval``; a
  stopping worker lets a GET that is on the wire finish and puts back (visibility
  0) whatever it dequeued;
* a running job's message stays invisible through ``update_message``;
* durable sleep: the successor is sent with a visibility timeout (up to 7 days);
* poison messages (dequeued more than ``max_receive_count`` times, or
  unreadable) move to ``<queue>-poison``;
* status records: one item per run in the status container, partitioned on
  ``/runId``; updates are partial, conditioned on the status where needed.
"""

from __future__ import annotations

import asyncio
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
from ._cosmos import literal, pointer, status_code, strip_system, with_throttling_retries
from .context import CosmosDbContext

logger = logging.getLogger("flowcraft.azure")


class AzureQueueAdapter(BaseDistributedAdapter):
    """A worker (and client) over Azure Queue Storage + Cosmos DB (+ Redis coordination).

    ``queue_client`` is an ``azure.storage.queue.aio.QueueClient``, ``cosmos_client`` an
    ``azure.cosmos.aio.CosmosClient``. Other keyword arguments are the
    :class:`~flowcraft.distributed.options.WorkerOptions`; an unknown one is a ``TypeError``.
    """

    max_delay_seconds = 7 * 24 * 3600.0
    retention_seconds: float | None = 30 * 24 * 3600.0
    """How long a finished run's status and context items are kept (Cosmos per-item
    ``ttl``); ``None`` keeps them."""
    max_visibility_seconds = 7 * 24 * 3600.0

    def __init__(
        self,
        runtime_options: RuntimeOptions,
        coordination_store: CoordinationStore,
        queue_client: Any,
        cosmos_client: Any,
        cosmos_database_name: str = "flowcraft-db",
        context_container_name: str = "contexts",
        status_container_name: str = "statuses",
        *,
        max_poll_interval: float = 1.0,
        poison_queue_client: Any = None,
        event_bus: EventBus | None = None,
        **options: Unpack[WorkerOptions],
    ) -> None:
        check_option_names("AzureQueueAdapter", options,
                           extra=("max_poll_interval", "poison_queue_client", "event_bus"))
        options.setdefault("batch_size", 32)
        check_worker_options({**options, "max_poll_interval": max_poll_interval},
                             max_lease_seconds=self.max_visibility_seconds,
                             extra={"max_poll_interval": (0, None, False, False)})
        super().__init__(runtime_options, coordination_store, event_bus, **options)
        self.queue = queue_client
        self.cosmos_client = cosmos_client
        self.cosmos_database_name = cosmos_database_name
        self.context_container_name = context_container_name
        self.status_container_name = status_container_name
        self.max_poll_interval = max_poll_interval
        self._poison_queue = poison_queue_client
        self._work_sent = asyncio.Event()
        self._receives = InFlightReceives(self._release)
        self._statuses = cosmos_client.get_database_client(
            cosmos_database_name).get_container_client(status_container_name)

    def create_context(self, run_id: str) -> CosmosDbContext:
        return CosmosDbContext(run_id, client=self.cosmos_client,
                               database_name=self.cosmos_database_name,
                               container_name=self.context_container_name)

    # -- queue -----------------------------------------------------------------------------

    async def _send_jobs(self, jobs: Sequence[JobPayload], delay_seconds: float = 0) -> None:
        delay = max(0, min(round(delay_seconds), int(self.max_delay_seconds)))

        async def send(job: JobPayload) -> None:
            await with_throttling_retries(
                lambda: self.queue.send_message(job.to_base64(), visibility_timeout=delay or None),
                what="sending a job")

        await asyncio.gather(*(send(job) for job in jobs))
        if not delay:
            self._work_sent.set()  # our own poller need not wait out its backoff

    async def _receive(self, max_messages: int, wait_seconds: float) -> list[QueueMessage]:
        deadline = time.monotonic() + wait_seconds
        pause = 0.05
        while True:
            self._work_sent.clear()
            messages = await self._receives.run(self._receive_once(max_messages))
            if messages or time.monotonic() >= deadline:
                return messages
            # Queue Storage has no long polling: back off, but wake up for our own sends.
            try:
                await asyncio.wait_for(self._work_sent.wait(),
                                       timeout=min(pause, max(0.0, deadline - time.monotonic())))
                pause = 0.05
            except TimeoutError:
                pause = min(pause * 2, self.max_poll_interval)

    async def _receive_once(self, max_messages: int) -> list[QueueMessage]:
        pages = self.queue.receive_messages(
            messages_per_page=max(1, min(32, max_messages)),
            # Whole seconds, never 0 (a fractional lease must not leave messages visible).
            visibility_timeout=max(1, math.ceil(self.lease_seconds)),
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
        await asyncio.gather(*(self._set_visibility(message, 0) for message in messages))

    async def stop(self, timeout_seconds: float | None = None) -> None:
        """Stop as the base class does; then let a receive that was on the wire finish and
        put back what it dequeued, before the clients may close."""
        await super().stop(timeout_seconds)
        await self._receives.drain(30.0)

    async def _delete(self, messages: Sequence[QueueMessage]) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        for message in messages:
            try:
                await self.queue.delete_message(message.message_id, message.handle)
            except ResourceNotFoundError:
                # Its pop receipt is stale: another worker has the message now and will
                # find the node done.
                logger.info("message %s was already taken over; not deleted", message.message_id)

    async def _set_visibility(self, message: QueueMessage, seconds: float) -> None:
        updated = await self.queue.update_message(
            message.message_id, message.handle,
            visibility_timeout=max(0, min(int(self.max_visibility_seconds), math.ceil(seconds))))
        message.handle = updated.pop_receipt  # every update issues a new pop receipt

    async def _dead_letter(self, message: QueueMessage, reason: str) -> None:
        poison = await self._poison()
        body = message.body if isinstance(message.body, str) else message.body.decode(
            "utf-8", "replace")
        await poison.send_message(body)
        logger.error("message %s moved to %s: %s", message.message_id, poison.queue_name, reason)
        if message.handle is not None:  # None: a Functions trigger owns the message
            await self._delete([message])

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

    # -- status records --------------------------------------------------------------------

    async def _write_status(self, run_id: str, fields: Mapping[str, Any], *,
                            only_if_running: bool) -> bool:
        from azure.cosmos.exceptions import CosmosHttpResponseError

        expire = self._expiry(fields)
        if expire is not None:
            fields = {**fields, "ttl": expire}
        patch = [{"op": "set", "path": pointer(k), "value": v}
                 for k, v in fields.items() if k not in ("id", "runId")]
        arguments: dict[str, Any] = {"partition_key": run_id, "patch_operations": patch}
        if only_if_running:
            arguments["filter_predicate"] = f"FROM c WHERE c.status = {literal('running')}"
        try:
            item = await with_throttling_retries(
                lambda: self._statuses.patch_item(run_id, **arguments),
                what=f"status of run {run_id}")
        except CosmosHttpResponseError as exc:
            if status_code(exc) == 412:
                return False
            if status_code(exc) != 404:
                raise
            return await self._create_status(run_id, fields, only_if_running)
        if "runId" not in item:
            await self._adopt_status(run_id)
        if expire is not None:
            await self._expire_context(run_id, expire)
        return True

    def _expiry(self, fields: Mapping[str, Any]) -> int | None:
        if self.retention_seconds is None or fields.get("status") not in (
                "completed", "failed", "cancelled"):
            return None
        return max(1, int(self.retention_seconds))

    async def _expire_context(self, run_id: str, seconds: int) -> None:
        """The context expires with its status record (Cosmos ``ttl``: seconds after the
        item's last write; the container's default ttl of -1 enables it)."""
        from azure.cosmos.exceptions import CosmosHttpResponseError

        contexts = self.cosmos_client.get_database_client(
            self.cosmos_database_name).get_container_client(self.context_container_name)
        try:
            await contexts.patch_item(run_id, partition_key=run_id, patch_operations=[
                {"op": "set", "path": "/ttl", "value": seconds}])
        except CosmosHttpResponseError as exc:
            if status_code(exc) not in (404, 500):  # no context in its partition: nothing
                raise

    async def _create_status(self, run_id: str, fields: Mapping[str, Any],
                             only_if_running: bool) -> bool:
        from azure.cosmos.exceptions import CosmosHttpResponseError

        existing = await self._find_status(run_id)
        if existing is not None:
            # A client-created record without runId: move it into its partition first.
            await self._adopt_status(run_id)
            return await self._write_status(run_id, fields, only_if_running=only_if_running)
        try:
            await self._statuses.create_item({"id": run_id, "runId": run_id, **fields})
        except CosmosHttpResponseError as exc:
            if status_code(exc) != 409:
                raise
            return await self._write_status(run_id, fields, only_if_running=only_if_running)
        return True

    async def _find_status(self, run_id: str) -> dict[str, Any] | None:
        query = "SELECT * FROM c WHERE c.id = @id"
        async for item in self._statuses.query_items(
                query, parameters=[{"name": "@id", "value": run_id}]):
            return strip_system(item)
        return None

    async def _adopt_status(self, run_id: str) -> None:
        """Move a status record written without ``runId`` (by a TypeScript client) into the
        run's partition: create it there, then remove exactly the version read."""
        from azure.core import MatchConditions
        from azure.cosmos.exceptions import CosmosHttpResponseError
        from azure.cosmos.partition_key import NonePartitionKeyValue

        async def delete_orphan(orphan: Mapping[str, Any]) -> None:
            # Conditioned on the orphan's etag: where a server keys items by id across
            # partitions (the local Cosmos server), this id may name the adopted item.
            await self._statuses.delete_item(
                run_id, partition_key=NonePartitionKeyValue, etag=orphan["_etag"],
                match_condition=MatchConditions.IfNotModified)

        for _ in range(10):
            found = [item async for item in self._statuses.query_items(
                "SELECT * FROM c WHERE c.id = @id",
                parameters=[{"name": "@id", "value": run_id}])]
            orphan = next((item for item in found if "runId" not in item), None)
            if orphan is None:
                return
            adopted = {**strip_system(orphan), "runId": run_id}
            try:
                await self._statuses.create_item(adopted)
            except CosmosHttpResponseError as exc:
                if status_code(exc) != 409:
                    raise
                try:
                    await self._statuses.read_item(run_id, partition_key=run_id)
                except CosmosHttpResponseError as read_error:
                    if status_code(read_error) == 500:
                        continue  # gone meanwhile (how the local Cosmos server says 404)
                    if status_code(read_error) != 404:
                        raise
                    # The orphan itself holds the id: replace it (delete, then create).
                    try:
                        await delete_orphan(orphan)
                    except CosmosHttpResponseError as delete_error:
                        if status_code(delete_error) in (404, 412):
                            continue
                        raise
                    try:
                        await self._statuses.create_item(adopted)
                    except CosmosHttpResponseError as create_error:
                        if status_code(create_error) == 409:
                            continue
                        raise
                    return
            try:
                await delete_orphan(orphan)
            except CosmosHttpResponseError:
                pass  # already gone, or another worker removed it
            return
        logger.warning("run %s: could not move its status record into its partition", run_id)

    async def _read_status(self, run_id: str) -> dict[str, Any] | None:
        from azure.cosmos.exceptions import CosmosHttpResponseError

        try:
            item = await self._statuses.read_item(run_id, partition_key=run_id)
        except CosmosHttpResponseError as exc:
            # 404 (or a record without runId); or 500, which the local Cosmos server answers
            # for an absent item: the query settles it.
            if status_code(exc) not in (404, 500):
                raise
            return await self._find_status(run_id)
        return strip_system(item)

    def _scan_statuses(self, status: str) -> AsyncIterator[dict[str, Any]]:
        return scan_status_container(self._statuses, status)

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> Any:
        """A :class:`~flowcraft.client.RunPage`: a query across partitions ordered by
        ``lastUpdated`` (newest first), paged with the server's continuation token."""
        from ...client import RunPage, RunSummary, _timestamp, decode_cursor, encode_cursor

        items, token = await query_status_container(
            self._statuses, statuses, blueprint_id=blueprint_id, since=since, limit=limit,
            continuation=decode_cursor(cursor).get("c") if cursor else None)
        return RunPage([RunSummary(str(i.get("runId") or i.get("id")), str(i.get("status")),
                                   i.get("blueprintId"), _timestamp(i.get("lastUpdated")),
                                   strip_system(i))
                        for i in items], encode_cursor({"c": token}) if token else None)


async def scan_status_container(container: Any,
                                status: str | None = "running") -> AsyncIterator[dict[str, Any]]:
    """Every status item (with ``status``, if given), across partitions and pages."""
    if status is None:
        items = container.query_items("SELECT * FROM c")
    else:
        items = container.query_items("SELECT * FROM c WHERE c.status = @status",
                                      parameters=[{"name": "@status", "value": status}])
    async for item in items:
        record = strip_system(item)
        record.setdefault("runId", record.get("id"))
        yield record


async def query_status_container(container: Any, statuses: Sequence[str], *,
                                 blueprint_id: str | None = None, since: str | None = None,
                                 before: str | None = None, limit: int = 50,
                                 continuation: str | None = None,
                                 ) -> tuple[list[dict[str, Any]], str | None]:
    """One page of status items with one of ``statuses``, newest ``lastUpdated`` first, and
    the continuation token of the next page (``None`` at the end)."""
    conditions = [f"c.status IN ({', '.join(f'@s{i}' for i in range(len(statuses)))})"]
    parameters: list[dict[str, Any]] = [{"name": f"@s{i}", "value": status}
                                        for i, status in enumerate(statuses)]
    for value, condition in ((blueprint_id, "c.blueprintId = @blueprint"),
                             (since, "c.lastUpdated >= @since"),
                             (before, "c.lastUpdated < @before")):
        if value:
            conditions.append(condition)
            parameters.append({"name": condition.rsplit(" ", 1)[1], "value": value})
    query = f"SELECT * FROM c WHERE {' AND '.join(conditions)} ORDER BY c.lastUpdated DESC"
    pages = container.query_items(query, parameters=parameters, max_item_count=limit).by_page(
        continuation)
    items: list[dict[str, Any]] = []
    async for page in pages:
        async for item in page:
            record = strip_system(item)
            record.setdefault("runId", record.get("id"))
            items.append(record)
        break
    return items, pages.continuation_token
