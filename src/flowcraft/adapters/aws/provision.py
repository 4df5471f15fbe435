"""``flowcraft provision aws``: the queue and the three tables of the setup guide, idempotently.

Creates (when missing) the SQS queue, the context and status tables (key
``runId``), the coordination table (key ``key``) with TTL on ``ttl``. The
status table gets the global secondary index ``status-lastUpdated`` that runs
are listed through (added with ``UpdateTable`` to a table created without
it); statuses get TTL on ``ttl``, contexts on ``_flowcraft.ttl`` (a context's
own keys are attributes: ``ttl`` may be a user's key), both written when a run
finishes, so finished runs expire. With a payload bucket named (the claim check,
``FLOWCRAFT_PAYLOAD_BUCKET``), also the bucket, with a lifecycle rule that expires the
objects under the claim check's prefix :data:`PAYLOAD_EXPIRY_DAYS` after they were
written (S3 counts from an object's creation, not from its run's end: a run kept open
longer than that, awaiting a resume, loses its large values). Running it again changes
nothing. Works against real AWS or any endpoint (``AWS_ENDPOINT_URL``), e.g. a local
moto server.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from ...errors import FlowcraftError
from ..claimcheck import DEFAULT_PREFIX

logger = logging.getLogger("flowcraft.aws")


@dataclass(frozen=True)
class AwsNames:
    queue_name: str = "flowcraft-jobs"
    context_table: str = "flowcraft-contexts"
    status_table: str = "flowcraft-statuses"
    coordination_table: str = "flowcraft-coordination"
    payload_bucket: str | None = None
    """The claim check's bucket; ``None``: no bucket is made."""


PAYLOAD_EXPIRY_DAYS = 30
"""The lifecycle rule's expiry: the run retention (``retention_seconds``, 30 days)."""
PAYLOAD_RULE_ID = "flowcraft-payload-expiry"


async def provision_aws(sqs: Any, dynamodb: Any, names: AwsNames | None = None,
                        s3: Any = None) -> dict[str, Any]:
    """Create what is missing; return ``{"queueUrl": ..., "created": [...]}``. ``s3`` (an
    aiobotocore S3 client) is needed when ``names`` has a payload bucket."""
    names = names or AwsNames()
    if names.payload_bucket and s3 is None:
        raise ValueError("provision_aws needs an S3 client to create the payload bucket")
    created: list[str] = []
    queue_url = await _queue(sqs, names.queue_name, created)
    for table, key in ((names.context_table, "runId"), (names.status_table, "runId"),
                       (names.coordination_table, "key")):
        await _table(dynamodb, table, key, created)
    await _status_index(dynamodb, names.status_table, created)
    for table, attribute in ((names.coordination_table, "ttl"), (names.status_table, "ttl"),
                             (names.context_table, CONTEXT_TTL_ATTRIBUTE)):
        await _ttl(dynamodb, table, attribute, created)
    if names.payload_bucket:
        await _bucket(s3, names.payload_bucket, created)
        await _expiry(s3, names.payload_bucket, created)
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


async def _bucket(s3: Any, name: str, created: list[str]) -> None:
    try:
        await s3.head_bucket(Bucket=name)
        return
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403:
            raise FlowcraftError(
                f"S3 bucket {name} exists but this account may not use it (bucket names are "
                "global: it may be another account's); choose another "
                "FLOWCRAFT_PAYLOAD_BUCKET") from None
        if status != 404:
            raise
    arguments: dict[str, Any] = {"Bucket": name}
    region = s3.meta.region_name
    if region and region != "us-east-1":
        arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await s3.create_bucket(**arguments)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code == "BucketAlreadyOwnedByYou":
            return
        if code == "BucketAlreadyExists":
            raise FlowcraftError(
                f"S3 bucket {name} belongs to another account (bucket names are global); "
                "choose another FLOWCRAFT_PAYLOAD_BUCKET") from None
        raise
    created.append(f"bucket {name}")


def payload_rule(days: int = PAYLOAD_EXPIRY_DAYS) -> dict[str, Any]:
    """The lifecycle rule expiring the claim check's objects."""
    return {"ID": PAYLOAD_RULE_ID, "Filter": {"Prefix": f"{DEFAULT_PREFIX}/"},
            "Status": "Enabled", "Expiration": {"Days": days}}


async def _expiry(s3: Any, bucket: str, created: list[str]) -> None:
    """The bucket's lifecycle rule for the claim check's prefix (other rules are kept)."""
    try:
        rules = (await s3.get_bucket_lifecycle_configuration(Bucket=bucket)).get("Rules", [])
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "NoSuchLifecycleConfiguration":
            raise
        rules = []
    wanted = payload_rule()
    ours = [rule for rule in rules if rule.get("ID") == PAYLOAD_RULE_ID]
    if ours and all(ours[0].get(k) == v for k, v in wanted.items()):
        return
    others = [rule for rule in rules if rule.get("ID") != PAYLOAD_RULE_ID]
    await s3.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [*others, wanted]})
    created.append(f"lifecycle {bucket}/{DEFAULT_PREFIX}/ ({PAYLOAD_EXPIRY_DAYS} days)")


STATUS_INDEX = "status-lastUpdated"
CONTEXT_TTL_ATTRIBUTE = "_flowcraft.ttl"


async def _status_index(dynamodb: Any, table: str, created: list[str]) -> None:
    """The index ``flowcraft runs`` and the reconciler query: ``status`` + ``lastUpdated``."""
    description = (await dynamodb.describe_table(TableName=table))["Table"]
    if any(index["IndexName"] == STATUS_INDEX
           for index in description.get("GlobalSecondaryIndexes", [])):
        return
    # The table's own definitions are repeated: some implementations replace the list.
    definitions = {d["AttributeName"]: d for d in description["AttributeDefinitions"]}
    definitions.update({name: {"AttributeName": name, "AttributeType": "S"}
                        for name in ("status", "lastUpdated")})
    await dynamodb.update_table(
        TableName=table,
        AttributeDefinitions=list(definitions.values()),
        GlobalSecondaryIndexUpdates=[{"Create": {
            "IndexName": STATUS_INDEX,
            "KeySchema": [{"AttributeName": "status", "KeyType": "HASH"},
                          {"AttributeName": "lastUpdated", "KeyType": "RANGE"}],
            "Projection": {"ProjectionType": "ALL"},
        }}],
    )
    for _ in range(300):
        indexes = (await dynamodb.describe_table(TableName=table))["Table"].get(
            "GlobalSecondaryIndexes", [])
        if all(index.get("IndexStatus", "ACTIVE") == "ACTIVE" for index in indexes):
            break
        await asyncio.sleep(1)
    created.append(f"index {table}.{STATUS_INDEX}")
