"""``DynamoDbCoordinationStore``: the coordination operations on a DynamoDB table.

Works on the table the AWS guide creates: partition key ``key``
(string) and TTL on the ``ttl`` attribute (epoch seconds). DynamoDB deletes
expired items lazily (up to days later), so every read treats an item whose
``ttl`` has passed as absent, and every write starts such an item afresh (an
expired counter counts from 1 again, an expired join set loses its members).
Values live in ``value``; join sets in the string-set attribute ``members``
(``ADD`` makes adding a member idempotent).
"""

from __future__ import annotations

import time
from typing import Any

from ...errors import FlowcraftError
from ._dynamo import Expression


class DynamoDbCoordinationStore:
    """A :class:`~flowcraft.distributed.coordination.FullCoordinationStore` on DynamoDB.

    Workers call ``get`` and ``set_if_not_exist``; ``increment``, ``extend_ttl``,
    ``delete``, ``join_add`` and ``join_members`` are there for applications sharing
    counters, markers or sets between workers."""

    def __init__(self, *, client: Any, table_name: str = "flowcraft-coordination",
                 key_attribute: str = "key", ttl_attribute: str = "ttl") -> None:
        self.client = client
        self.table_name = table_name
        self.key_attribute = key_attribute
        self.ttl_attribute = ttl_attribute

    def _key(self, key: str) -> dict[str, Any]:
        return {self.key_attribute: {"S": key}}

    @staticmethod
    def _expiry(ttl_seconds: int) -> int:
        return int(time.time()) + int(ttl_seconds) if ttl_seconds > 0 else 0

    def _live_condition(self, expression: Expression) -> str:
        ttl = expression.name(self.ttl_attribute)
        return (f"(attribute_not_exists({ttl}) OR {ttl} = {expression.value(0)} "
                f"OR {ttl} > {expression.value(int(time.time()))})")

    async def _get_item(self, key: str) -> dict[str, Any] | None:
        response = await self.client.get_item(TableName=self.table_name, Key=self._key(key),
                                              ConsistentRead=True)
        item = response.get("Item")
        if item is None:
            return None
        ttl = int(item.get(self.ttl_attribute, {}).get("N", "0"))
        if ttl and ttl <= int(time.time()):
            return None
        return dict(item)

    def _expired_condition(self, expression: Expression) -> str:
        ttl = expression.name(self.ttl_attribute)
        return (f"({ttl} <> {expression.value(0)} AND "
                f"{ttl} <= {expression.value(int(time.time()))})")

    async def _restart_expired(self, key: str, update: str, expression: Expression) -> bool:
        """Overwrite an expired (not yet swept) item, only while it is still expired: of
        workers racing to restart it, one wins and the others retry their normal update."""
        try:
            await self.client.update_item(
                TableName=self.table_name, Key=self._key(key), UpdateExpression=update,
                ConditionExpression=self._expired_condition(expression),
                **expression.arguments(),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    async def increment(self, key: str, ttl_seconds: int) -> int:
        for _ in range(5):
            expression = Expression()
            value, ttl = expression.name("value"), expression.name(self.ttl_attribute)
            live = self._live_condition(expression)
            try:
                response = await self.client.update_item(
                    TableName=self.table_name, Key=self._key(key),
                    UpdateExpression=f"SET {value} = if_not_exists({value}, "
                                     f"{expression.value(0)}) + {expression.value(1)}, "
                                     f"{ttl} = {expression.value(self._expiry(ttl_seconds))}",
                    ConditionExpression=live, ReturnValues="UPDATED_NEW",
                    **expression.arguments(),
                )
                return int(response["Attributes"]["value"]["N"])
            except self.client.exceptions.ConditionalCheckFailedException:
                pass
            # The counter expired but is not yet swept: start it again (once).
            expression = Expression()
            update = (f"SET {expression.name('value')} = {expression.value(1)}, "
                      f"{expression.name(self.ttl_attribute)} = "
                      f"{expression.value(self._expiry(ttl_seconds))}")
            if await self._restart_expired(key, update, expression):
                return 1
        raise FlowcraftError(f"coordination key {key}: could not increment (contention)")

    async def set_if_not_exist(self, key: str, value: str, ttl_seconds: int) -> bool:
        expression = Expression()
        ttl = expression.name(self.ttl_attribute)
        condition = (f"attribute_not_exists({expression.name(self.key_attribute)}) OR "
                     f"({ttl} <> {expression.value(0)} AND {ttl} <= "
                     f"{expression.value(int(time.time()))})")
        try:
            await self.client.put_item(
                TableName=self.table_name,
                Item={**self._key(key), "value": {"S": value},
                      self.ttl_attribute: {"N": str(self._expiry(ttl_seconds))}},
                ConditionExpression=condition, **expression.arguments(),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    async def extend_ttl(self, key: str, ttl_seconds: int) -> bool:
        expression = Expression()
        condition = (f"attribute_exists({expression.name(self.key_attribute)}) AND "
                     + self._live_condition(expression))
        try:
            await self.client.update_item(
                TableName=self.table_name, Key=self._key(key),
                UpdateExpression=f"SET {expression.name(self.ttl_attribute)} = "
                                 f"{expression.value(self._expiry(ttl_seconds))}",
                ConditionExpression=condition, **expression.arguments(),
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            return False
        return True

    async def delete(self, key: str) -> None:
        await self.client.delete_item(TableName=self.table_name, Key=self._key(key))

    async def get(self, key: str) -> str | None:
        item = await self._get_item(key)
        if item is None or "value" not in item:
            return None
        attribute = item["value"]
        value = attribute.get("S") if "S" in attribute else attribute.get("N")
        return None if value is None else str(value)

    async def join_add(self, key: str, member: str, ttl_seconds: int) -> int:
        for _ in range(5):
            expression = Expression()
            members = expression.attribute({"SS": [member]})
            try:
                response = await self.client.update_item(
                    TableName=self.table_name, Key=self._key(key),
                    UpdateExpression=f"ADD {expression.name('members')} {members} "
                                     f"SET {expression.name(self.ttl_attribute)} = "
                                     f"{expression.value(self._expiry(ttl_seconds))}",
                    ConditionExpression=self._live_condition(expression),
                    ReturnValues="ALL_NEW", **expression.arguments(),
                )
                return len(response["Attributes"]["members"]["SS"])
            except self.client.exceptions.ConditionalCheckFailedException:
                pass
            # The set expired but is not yet swept: its old members no longer count.
            expression = Expression()
            update = (f"SET {expression.name('members')} = "
                      f"{expression.attribute({'SS': [member]})}, "
                      f"{expression.name(self.ttl_attribute)} = "
                      f"{expression.value(self._expiry(ttl_seconds))}")
            if await self._restart_expired(key, update, expression):
                return 1
        raise FlowcraftError(f"coordination key {key}: could not add a join member "
                             "(contention)")

    async def join_members(self, key: str) -> set[str]:
        item = await self._get_item(key)
        if item is None:
            return set()
        return set(item.get("members", {}).get("SS", []))

