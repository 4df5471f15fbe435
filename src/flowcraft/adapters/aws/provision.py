"""``flowcraft provision aws``: the queue and the three tables of the setup guide, idempotently.

Creates (when missing) the SQS queue, the context and status tables (key
``runId``), the coordination table (key ``key``) with TTL on ``ttl``. Running
it again changes nothing. Works against real AWS or any endpoint
(``AWS_ENDPOINT_URL``), e.g. a local moto server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from ...errors import FlowcraftError

logger = logging.getLogger("flowcraft.aws")


@dataclass(frozen=True)
class AwsNames:
    queue_name: str = "flowcraft-jobs"
    context_table: str = "flowcraft-contexts"
    status_table: str = "flowcraft-statuses"
    coordination_table: str = "flowcraft-coordination"


async def provision_aws(sqs: Any, dynamodb: Any, names: AwsNames | None = None) -> dict[str, Any]:
    """Create what is missing; return ``{"queueUrl": ..., "created": [...]}``."""
    names = names or AwsNames()
    created: list[str] = []
    queue_url = await _queue(sqs, names.queue_name, created)
    for table, key in ((names.context_table, "runId"), (names.status_table, "runId"),
                       (names.coordination_table, "key")):
        await _table(dynamodb, table, key, created)
    await _ttl(dynamodb, names.coordination_table, "ttl", created)
    return {"queueUrl": queue_url, "created": created}


async def _queue(sqs: Any, name: str, created: list[str]) -> str:
    try:
        return str((await sqs.get_queue_url(QueueName=name))["QueueUrl"])
    except sqs.exceptions.QueueDoesNotExist:
        pass
    url = str((await sqs.create_queue(QueueName=name))["QueueUrl"])
    created.append(f"queue {name}")
    return url


async def _table(dynamodb: Any, name: str, key: str, created: list[str]) -> None:
    try:
        description = await dynamodb.describe_table(TableName=name)
        schema = description["Table"]["KeySchema"]
        if schema != [{"AttributeName": key, "KeyType": "HASH"}]:
            keys = ", ".join(f"{k['AttributeName']} ({k['KeyType']})" for k in schema)
            raise FlowcraftError(
                f"table {name} exists with the key {keys}, but flowcraft needs a single "
                f"partition key '{key}' of type string; delete the table or choose another "
                "name")
        return
    except dynamodb.exceptions.ResourceNotFoundException:
        pass
    await dynamodb.create_table(
        TableName=name,
        AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
        KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
    )
    for _ in range(120):
        status = (await dynamodb.describe_table(TableName=name))["Table"]["TableStatus"]
        if status == "ACTIVE":
            break
        await asyncio.sleep(1)
    created.append(f"table {name}")


async def _ttl(dynamodb: Any, table: str, attribute: str, created: list[str]) -> None:
    description = await dynamodb.describe_time_to_live(TableName=table)
    current = description.get("TimeToLiveDescription", {})
    if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING") and current.get(
        "AttributeName"
    ) == attribute:
        return
    await dynamodb.update_time_to_live(
        TableName=table, TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute})
    created.append(f"ttl {table}.{attribute}")
