"""Runs and status records in DynamoDB: ``DynamoDbRunStore`` and ``DynamoDbStatusStore``.

* contexts: one item per run in the context table
  (:class:`~flowcraft.adapters.aws.context.DynamoDbContext`), large values in S3 when
  the store has a payload store;
* status records: one item per run in the status table (``runId``,
  ``status``, ``lastUpdated``, ``finalStatus``, ...), written with
  ``UpdateItem`` (conditioned on ``status = running`` where the algorithm
  asks); a finished run's status item gets ``ttl`` and its context item
  ``_flowcraft.ttl``, ``retention_seconds`` ahead;
* listing: the ``status-lastUpdated`` index (a Query per status, newest first,
  paged with a cursor); ``scan`` reads the whole table, every page.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from ...distributed.backend import RunPage, RunSummary, decode_cursor, encode_cursor, iso_datetime
from ...errors import FlowcraftError
from ..claimcheck import PayloadStore
from ._dynamo import Expression, from_item
from .context import KEY, DynamoDbContext
from .provision import CONTEXT_TTL_ATTRIBUTE, STATUS_INDEX


class DynamoDbRunStore:
    """The runs' contexts, one item per run in ``table_name``; with ``payloads``, values
    too large for the item in S3 (one store, and so one cache, for every context)."""

    def __init__(self, dynamodb_client: Any, table_name: str, *,
                 payloads: PayloadStore | None = None) -> None:
        self.dynamodb = dynamodb_client
        self.table_name = table_name
        self.payloads = payloads

    def context(self, run_id: str) -> DynamoDbContext:
        return DynamoDbContext(run_id, client=self.dynamodb, table_name=self.table_name,
                               payloads=self.payloads)

    async def load_many(self, run_ids: Sequence[str]) -> dict[str, dict[str, Any] | None]:
        """The contexts of up to 100 runs in one ``BatchGetItem`` (strongly consistent; keys
        DynamoDB leaves unprocessed are asked again); absent ones are ``None``."""
        found: dict[str, dict[str, Any] | None] = dict.fromkeys(run_ids)
        request: dict[str, Any] = {self.table_name: {
            "Keys": [{KEY: {"S": run_id}} for run_id in run_ids], "ConsistentRead": True}}
        for attempt in range(20):
            response = await self.dynamodb.batch_get_item(RequestItems=request)
            for item in response.get("Responses", {}).get(self.table_name, []):
                context = self.context(item[KEY]["S"])
                found[context.run_id] = await context.resolved_item(item)
            request = response.get("UnprocessedKeys") or {}
            if not request:
                return found
            await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt))
        raise FlowcraftError(f"DynamoDB left {len(request[self.table_name]['Keys'])} keys "
                             "unprocessed after 20 batched reads; is the table throttled?")


class DynamoDbStatusStore:
    """Status records in ``table_name``; finished runs expire with their context item in
    ``context_table_name`` (see the module docstring)."""

    retention_seconds: float | None = 30 * 24 * 3600.0
    """How long a finished run's context and status items are kept (DynamoDB TTL on the
    status item's ``ttl`` and the context item's ``_flowcraft.ttl``); ``None`` keeps them."""

    def __init__(self, dynamodb_client: Any, table_name: str, context_table_name: str) -> None:
        self.dynamodb = dynamodb_client
        self.table_name = table_name
        self.context_table_name = context_table_name

    async def write(self, run_id: str, fields: Mapping[str, Any], *,
                    only_if_running: bool) -> bool:
        expire = self._expiry(fields)
        if expire is not None:
            fields = {**fields, "ttl": expire}
        expression = Expression()
        sets = ", ".join(f"{expression.name(k)} = {expression.value(v)}"
                         for k, v in fields.items() if k != "runId")
        arguments: dict[str, Any] = {
            "TableName": self.table_name, "Key": {"runId": {"S": run_id}},
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

    async def read(self, run_id: str) -> dict[str, Any] | None:
        response = await self.dynamodb.get_item(TableName=self.table_name,
                                                Key={"runId": {"S": run_id}},
                                                ConsistentRead=True)
        item = response.get("Item")
        return from_item(item) if item else None

    def scan(self, status: str) -> AsyncIterator[dict[str, Any]]:
        return scan_status_table(self.dynamodb, self.table_name, status)

    async def list_statuses(self, statuses: Sequence[str], *, blueprint_id: str | None = None,
                            since: str | None = None, limit: int = 50,
                            cursor: str | None = None) -> RunPage:
        """A :class:`~flowcraft.distributed.backend.RunPage` through the status index (no
        scan)."""

        items, next_cursor = await query_status_index(
            self.dynamodb, self.table_name, statuses, blueprint_id=blueprint_id,
            since=since, limit=limit, cursor=cursor)
        return RunPage([RunSummary(str(i["runId"]), str(i.get("status")), i.get("blueprintId"),
                                   iso_datetime(i.get("lastUpdated")), i) for i in items],
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


async def query_status_index(client: Any, table_name: str, statuses: Sequence[str], *,
                             blueprint_id: str | None = None, since: str | None = None,
                             before: str | None = None, limit: int = 50,
                             cursor: str | None = None) -> tuple[list[dict[str, Any]],
                                                                 str | None]:
    """A page of status items through the status index (newest ``lastUpdated`` first within
    each status, the statuses one after another) and the cursor of the next page."""

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
