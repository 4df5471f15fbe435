"""``DynamoDbCoordinationStore``: the coordination operations on a DynamoDB table.

Works on the table the seed documentation creates: partition key ``key``
(string) and TTL on the ``ttl`` attribute (epoch seconds). DynamoDB deletes
expired items lazily (up to days later), so every read treats an item whose
``ttl`` has passed as absent. Values live in ``value``; join sets in the
string-set attribute ``members`` (``ADD`` makes adding a member idempotent).
"""

from __future__ import annotations

import time
from typing import Any

from ._dynamo import Expression


class DynamoDbCoordinationStore:
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
        return item

    async def increment(self, key: str, ttl_seconds: int) -> int:
        expression = Expression()
        value, ttl = expression.name("value"), expression.name(self.ttl_attribute)
        live = self._live_condition(expression)
        try:
            response = await self.client.update_item(
                TableName=self.table_name, Key=self._key(key),
                UpdateExpression=f"SET {value} = if_not_exists({value}, {expression.value(0)}) "
                                 f"+ {expression.value(1)}, {ttl} = "
                                 f"{expression.value(self._expiry(ttl_seconds))}",
                ConditionExpression=live, ReturnValues="UPDATED_NEW", **expression.arguments(),
            )
            return int(response["Attributes"]["value"]["N"])
        except self.client.exceptions.ConditionalCheckFailedException:
            # The counter expired but is not yet swept: start it again.
            await self.client.put_item(TableName=self.table_name, Item={
                **self._key(key), "value": {"N": "1"},
                self.ttl_attribute: {"N": str(self._expiry(ttl_seconds))},
            })
            return 1

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
        return attribute.get("S") if "S" in attribute else attribute.get("N")

    async def join_add(self, key: str, member: str, ttl_seconds: int) -> int:
        expression = Expression()
        members = expression.attribute({"SS": [member]})
        response = await self.client.update_item(
            TableName=self.table_name, Key=self._key(key),
            UpdateExpression=f"ADD {expression.name('members')} {members} "
                             f"SET {expression.name(self.ttl_attribute)} = "
                             f"{expression.value(self._expiry(ttl_seconds))}",
            ReturnValues="ALL_NEW", **expression.arguments(),
        )
        return len(response["Attributes"]["members"]["SS"])

    async def join_members(self, key: str) -> set[str]:
        item = await self._get_item(key)
        if item is None:
            return set()
        return set(item.get("members", {}).get("SS", []))

