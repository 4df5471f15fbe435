"""Runs and status records in Cosmos DB: ``CosmosDbRunStore`` and ``CosmosDbStatusStore``.

* contexts: one item per run in the context container, partitioned on
  ``/runId`` (:class:`~flowcraft.adapters.azure.context.CosmosDbContext`), large values
  in Blob Storage when the store has a payload store;
* status records: one item per run in the status container, partitioned on
  ``/runId``; updates are partial, conditioned on the status where needed. A
  record a TypeScript client wrote without ``runId`` is found by a query across
  partitions and moved into its partition on the first write. A finished run's
  status and context items get ``ttl`` (``retention_seconds``);
* listing: a query across partitions ordered by ``lastUpdated``, paged with the
  server's continuation token; ``scan`` reads every record with a status.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ...distributed.backend import RunPage, RunSummary, decode_cursor, encode_cursor, iso_datetime
from ..claimcheck import PayloadStore
from ._cosmos import literal, pointer, status_code, strip_system, with_throttling_retries
from .context import CosmosDbContext

logger = logging.getLogger("flowcraft.azure")


class CosmosDbRunStore:
    """The runs' contexts, one item per run in ``container_name`` of ``database_name``; with
    ``payloads``, values too large for the item in Blob Storage (one store, and so one cache,
    for every context)."""

    def __init__(self, cosmos_client: Any, database_name: str, container_name: str, *,
                 payloads: PayloadStore | None = None) -> None:
        self.cosmos_client = cosmos_client
        self.database_name = database_name
        self.container_name = container_name
        self.payloads = payloads

    def context(self, run_id: str) -> CosmosDbContext:
        return CosmosDbContext(run_id, client=self.cosmos_client,
                               database_name=self.database_name,
                               container_name=self.container_name, payloads=self.payloads)


class CosmosDbStatusStore:
    """Status records in ``status_container_name``; finished runs expire with their context
    item in ``context_container_name`` (see the module docstring)."""

    retention_seconds: float | None = 30 * 24 * 3600.0
    """How long a finished run's status and context items are kept (Cosmos per-item
    ``ttl``); ``None`` keeps them."""

    def __init__(self, cosmos_client: Any, database_name: str, status_container_name: str,
                 context_container_name: str) -> None:
        database = cosmos_client.get_database_client(database_name)
        self.container = database.get_container_client(status_container_name)
        self.contexts = database.get_container_client(context_container_name)

    async def write(self, run_id: str, fields: Mapping[str, Any], *,
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
                lambda: self.container.patch_item(run_id, **arguments),
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

        try:
            await self.contexts.patch_item(run_id, partition_key=run_id, patch_operations=[
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
            return await self.write(run_id, fields, only_if_running=only_if_running)
        try:
            await self.container.create_item({"id": run_id, "runId": run_id, **fields})
        except CosmosHttpResponseError as exc:
            if status_code(exc) != 409:
                raise
            return await self.write(run_id, fields, only_if_running=only_if_running)
        return True

    async def _find_status(self, run_id: str) -> dict[str, Any] | None:
        query = "SELECT * FROM c WHERE c.id = @id"
        async for item in self.container.query_items(
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
            await self.container.delete_item(
                run_id, partition_key=NonePartitionKeyValue, etag=orphan["_etag"],
                match_condition=MatchConditions.IfNotModified)

        for _ in range(10):
            found = [item async for item in self.container.query_items(
                "SELECT * FROM c WHERE c.id = @id",
                parameters=[{"name": "@id", "value": run_id}])]
            orphan = next((item for item in found if "runId" not in item), None)
            if orphan is None:
                return
            adopted = {**strip_system(orphan), "runId": run_id}
            try:
                await self.container.create_item(adopted)
            except CosmosHttpResponseError as exc:
                if status_code(exc) != 409:
                    raise
                try:
                    await self.container.read_item(run_id, partition_key=run_id)
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
                        await self.container.create_item(adopted)
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

    async def read(self, run_id: str) -> dict[str, Any] | None:
        from azure.cosmos.exceptions import CosmosHttpResponseError

        try:
            item = await self.container.read_item(run_id, partition_key=run_id)
        except CosmosHttpResponseError as exc:
            # 404 (or a record without runId); or 500, which the local Cosmos server answers
            # for an absent item: the query settles it.
            if status_code(exc) not in (404, 500):
                raise
            return await self._find_status(run_id)
        return strip_system(item)

    def scan(self, status: str) -> AsyncIterator[dict[str, Any]]:
        return scan_status_container(self.container, status)

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> RunPage:
        """A :class:`~flowcraft.distributed.backend.RunPage`: a query across partitions ordered by
        ``lastUpdated`` (newest first), paged with the server's continuation token."""

        items, token = await query_status_container(
            self.container, statuses, blueprint_id=blueprint_id, since=since, limit=limit,
            continuation=decode_cursor(cursor).get("c") if cursor else None)
        return RunPage([RunSummary(str(i.get("runId") or i.get("id")), str(i.get("status")),
                                   i.get("blueprintId"), iso_datetime(i.get("lastUpdated")),
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
