"""Connection settings and client construction for the command line and the demo.

Settings come from flags, else the usual environment variables, else the
names of the setup guides (queue ``flowcraft-jobs``; tables
``flowcraft-contexts``, ``flowcraft-statuses``, ``flowcraft-coordination``;
Cosmos database ``flowcraft-db`` with containers ``contexts`` and ``statuses``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from .errors import FlowcraftError


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


@dataclass
class AwsSettings:
    region: str | None = None
    endpoint_url: str | None = None
    queue_url: str | None = None
    queue_name: str = "flowcraft-jobs"
    context_table: str = "flowcraft-contexts"
    status_table: str = "flowcraft-statuses"
    coordination_table: str = "flowcraft-coordination"

    ENVIRONMENT = {
        "region": "AWS_REGION", "endpoint_url": "AWS_ENDPOINT_URL", "queue_url": "SQS_QUEUE_URL",
        "queue_name": "FLOWCRAFT_QUEUE_NAME", "context_table": "FLOWCRAFT_CONTEXT_TABLE",
        "status_table": "FLOWCRAFT_STATUS_TABLE",
        "coordination_table": "FLOWCRAFT_COORDINATION_TABLE",
    }

    @classmethod
    def resolve(cls, **flags: Any) -> AwsSettings:
        """Flags win over environment variables, which win over defaults."""
        settings = cls()
        for field in fields(cls):
            value = flags.get(field.name) or _env(cls.ENVIRONMENT[field.name])
            if value:
                setattr(settings, field.name, value)
        settings.region = settings.region or _env("AWS_DEFAULT_REGION", "us-east-1")
        return settings


@contextlib.asynccontextmanager
async def aws_clients(settings: AwsSettings) -> AsyncIterator[tuple[Any, Any]]:
    """``(sqs, dynamodb)`` aiobotocore clients for the settings."""
    try:
        from aiobotocore.session import get_session
    except ImportError:
        raise FlowcraftError(
            "the AWS backend needs the aws extra: pip install 'flowcraft-py[aws]'") from None
    session = get_session()
    options = {"region_name": settings.region}
    if settings.endpoint_url:
        options["endpoint_url"] = settings.endpoint_url
    async with session.create_client("sqs", **options) as sqs, session.create_client(
        "dynamodb", **options
    ) as dynamodb:
        yield sqs, dynamodb


async def resolve_queue_url(sqs: Any, settings: AwsSettings) -> str:
    if settings.queue_url:
        return settings.queue_url
    try:
        response = await sqs.get_queue_url(QueueName=settings.queue_name)
    except sqs.exceptions.QueueDoesNotExist:
        raise FlowcraftError(
            f"SQS queue '{settings.queue_name}' does not exist; run `flowcraft provision aws` "
            "or set SQS_QUEUE_URL") from None
    return str(response["QueueUrl"])


@contextlib.asynccontextmanager
async def aws_adapter(settings: AwsSettings, runtime_options: Any,
                      **adapter_options: Any) -> AsyncIterator[Any]:
    """A ready :class:`~flowcraft.adapters.aws.SqsAdapter` for the settings."""
    from .adapters.aws import DynamoDbCoordinationStore, SqsAdapter

    async with aws_clients(settings) as (sqs, dynamodb):
        adapter = SqsAdapter(
            runtime_options,
            DynamoDbCoordinationStore(client=dynamodb, table_name=settings.coordination_table),
            sqs, dynamodb, await resolve_queue_url(sqs, settings),
            context_table_name=settings.context_table,
            status_table_name=settings.status_table,
            **adapter_options,
        )
        yield adapter
