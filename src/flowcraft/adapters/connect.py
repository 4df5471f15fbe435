"""Connection settings, and the SDK clients and adapters opened from them.

:class:`AwsSettings` and :class:`AzureSettings` resolve where the services are:
flags (keyword arguments), else the usual environment variables, else the names
of the setup guides (queue ``flowcraft-jobs``; tables ``flowcraft-contexts``,
``flowcraft-statuses``, ``flowcraft-coordination``; Cosmos database
``flowcraft-db`` with containers ``contexts`` and ``statuses``). The claim check
(:mod:`flowcraft.adapters.claimcheck`) is on where a payload bucket
(``FLOWCRAFT_PAYLOAD_BUCKET``) or blob container (``FLOWCRAFT_PAYLOAD_CONTAINER``) is
named; there is no default name (S3 bucket names are global), so without one a run's
values stay in its item, as they always did.

The rest turns settings into open things, each an async context manager that
closes what it opened: the SDK clients (:func:`aws_clients`,
:func:`azure_clients`, and :func:`aws_payloads` / :func:`azure_payloads` for the
claim check's store), an adapter on them (:func:`aws_adapter`,
:func:`azure_adapter`, or :func:`open_adapter` for either), a reconciler over
the status store (:func:`open_reconciler`); :func:`provision` creates what is
missing. ``calls`` counts every request the clients send, by
``service.Operation`` (retries included).

The :class:`~flowcraft.worker.Worker`, the :class:`~flowcraft.client.Client`,
the serverless handlers and the command line all connect through this module;
the SDKs are imported only when a client is opened, so an installation without
the ``aws`` or ``azure`` extra hears which extra is missing.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from ..errors import FlowcraftError


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
    payload_bucket: str | None = None
    """The S3 bucket of the claim check (values too large for a run's item); ``None``: off."""

    ENVIRONMENT = {
        "region": "AWS_REGION", "endpoint_url": "AWS_ENDPOINT_URL", "queue_url": "SQS_QUEUE_URL",
        "queue_name": "FLOWCRAFT_QUEUE_NAME", "context_table": "FLOWCRAFT_CONTEXT_TABLE",
        "status_table": "FLOWCRAFT_STATUS_TABLE",
        "coordination_table": "FLOWCRAFT_COORDINATION_TABLE",
        "payload_bucket": "FLOWCRAFT_PAYLOAD_BUCKET",
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


CallCounter = Counter
"""Service requests by ``service.Operation``, counted as they are sent (retries included)."""


@contextlib.asynccontextmanager
async def aws_clients(settings: AwsSettings,
                      calls: Counter[str] | None = None) -> AsyncIterator[tuple[Any, Any]]:
    """``(sqs, dynamodb)`` aiobotocore clients for the settings; ``calls`` counts requests."""
    try:
        from aiobotocore.session import get_session
    except ImportError:
        raise FlowcraftError(
            "the AWS backend needs the aws extra: pip install 'flowcraft-py[aws]'") from None
    session = get_session()
    options = _aws_options(settings)
    async with session.create_client("sqs", **options) as sqs, session.create_client(
        "dynamodb", **options
    ) as dynamodb:
        if calls is not None:
            for client, service in ((sqs, "sqs"), (dynamodb, "dynamodb")):
                client.meta.events.register(f"before-send.{service}", _aws_counter(calls))
        yield sqs, dynamodb


def _aws_options(settings: AwsSettings) -> dict[str, Any]:
    options = {"region_name": settings.region}
    if settings.endpoint_url:
        options["endpoint_url"] = settings.endpoint_url
    return options


@contextlib.asynccontextmanager
async def aws_s3_client(settings: AwsSettings,
                        calls: Counter[str] | None = None) -> AsyncIterator[Any]:
    """An aiobotocore S3 client for the settings; ``calls`` counts its requests."""
    from aiobotocore.session import get_session

    async with get_session().create_client("s3", **_aws_options(settings)) as s3:
        if calls is not None:
            s3.meta.events.register("before-send.s3", _aws_counter(calls))
        yield s3


@contextlib.asynccontextmanager
async def aws_payloads(settings: AwsSettings,
                       calls: Counter[str] | None = None) -> AsyncIterator[Any]:
    """An :class:`~flowcraft.adapters.aws.payloads.S3PayloadStore` on the settings'
    payload bucket (with an S3 client of its own), or ``None`` when no bucket is named."""
    if not settings.payload_bucket:
        yield None
        return
    from .aws.payloads import S3PayloadStore

    async with aws_s3_client(settings, calls) as s3:
        yield S3PayloadStore(s3, settings.payload_bucket)


def _aws_counter(calls: Counter[str]) -> Any:
    def count(event_name: str, **_: Any) -> None:
        # event_name is "before-send.<service>.<Operation>"
        calls[event_name.split(".", 1)[1]] += 1

    return count


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
                      calls: Counter[str] | None = None,
                      **adapter_options: Any) -> AsyncIterator[Any]:
    """A ready :class:`~flowcraft.adapters.aws.SqsAdapter` for the settings."""
    async with aws_clients(settings, calls) as (sqs, dynamodb), aws_payloads(
            settings, calls) as payloads:
        yield await _sqs_adapter(settings, runtime_options, sqs, dynamodb,
                                 payloads=payloads, **adapter_options)


async def _sqs_adapter(settings: AwsSettings, runtime_options: Any, sqs: Any, dynamodb: Any,
                       **adapter_options: Any) -> Any:
    from .aws import DynamoDbCoordinationStore, SqsAdapter

    return SqsAdapter(
        runtime_options,
        DynamoDbCoordinationStore(client=dynamodb, table_name=settings.coordination_table),
        sqs, dynamodb, await resolve_queue_url(sqs, settings),
        context_table_name=settings.context_table,
        status_table_name=settings.status_table,
        **adapter_options,
    )


@dataclass
class AzureSettings:
    storage_connection_string: str | None = None
    cosmos_connection_string: str | None = None
    redis_url: str | None = None
    queue_name: str = "flowcraft-jobs"
    database: str = "flowcraft-db"
    context_container: str = "contexts"
    status_container: str = "statuses"
    payload_container: str | None = None
    """The blob container of the claim check (values too large for a run's item), in the
    storage account of the connection string; ``None``: off."""
    verify_tls: bool = True

    ENVIRONMENT = {
        "storage_connection_string": "AZURE_STORAGE_CONNECTION_STRING",
        "cosmos_connection_string": "COSMOS_DB_CONNECTION_STRING",
        "redis_url": "REDIS_CONNECTION_STRING", "queue_name": "FLOWCRAFT_QUEUE_NAME",
        "database": "FLOWCRAFT_COSMOS_DATABASE",
        "context_container": "FLOWCRAFT_CONTEXT_CONTAINER",
        "status_container": "FLOWCRAFT_STATUS_CONTAINER",
        "payload_container": "FLOWCRAFT_PAYLOAD_CONTAINER",
    }

    @classmethod
    def resolve(cls, **flags: Any) -> AzureSettings:
        settings = cls()
        for name, variable in cls.ENVIRONMENT.items():
            value = flags.get(name) or _env(variable)
            if value:
                setattr(settings, name, value)
        settings.verify_tls = (_env("COSMOS_DB_VERIFY_TLS", "true") or "true").lower() not in (
            "false", "0", "no")
        return settings

    def require(self) -> None:
        missing = [variable for name, variable in self.ENVIRONMENT.items()
                   if name in ("storage_connection_string", "cosmos_connection_string",
                               "redis_url") and not getattr(self, name)]
        if missing:
            raise FlowcraftError(f"the Azure backend needs {', '.join(missing)} (or the "
                                 "matching flags)")

    def cosmos_verify(self) -> bool:
        """TLS checks may be turned off only for a Cosmos server on this machine."""
        if self.verify_tls:
            return True
        endpoint = _connection_value(self.cosmos_connection_string or "", "AccountEndpoint")
        host = (endpoint or "").split("://")[-1].split("/")[0].rsplit(":", 1)[0].strip("[]")
        if host not in ("localhost", "::1") and not host.startswith("127."):
            raise FlowcraftError("COSMOS_DB_VERIFY_TLS=false is only allowed for a local Cosmos "
                                 f"emulator, not for {host}")
        return False


def _connection_value(connection_string: str, key: str) -> str | None:
    for part in connection_string.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == key.lower():
            return value.strip()
    return None


@contextlib.asynccontextmanager
async def azure_clients(settings: AzureSettings, calls: Counter[str] | None = None,
                        ) -> AsyncIterator[tuple[Any, Any, Any, Any]]:
    """``(queue_client, queue_service, cosmos_client, redis)`` for the settings; ``calls``
    counts HTTP requests (queue, Cosmos) and Redis round trips."""
    settings.require()
    try:
        import redis.asyncio as redis_asyncio
        from azure.cosmos.aio import CosmosClient
        from azure.storage.queue.aio import QueueClient, QueueServiceClient
    except ImportError:
        raise FlowcraftError(
            "the Azure backend needs the azure extra: pip install 'flowcraft-py[azure]'"
        ) from None
    assert settings.storage_connection_string and settings.cosmos_connection_string
    assert settings.redis_url
    verify = settings.cosmos_verify()
    if not verify:
        import warnings

        warnings.filterwarnings("ignore", message="Unverified HTTPS request")
    service = QueueServiceClient.from_connection_string(settings.storage_connection_string,
                                                        **_azure_counter(calls, "queue"))
    queue = QueueClient.from_connection_string(settings.storage_connection_string,
                                               settings.queue_name,
                                               **_azure_counter(calls, "queue"))
    cosmos = CosmosClient.from_connection_string(settings.cosmos_connection_string,
                                                 connection_verify=verify,
                                                 **_azure_counter(calls, "cosmos"))
    redis = redis_asyncio.from_url(settings.redis_url)
    try:
        async with service, queue:
            try:
                await cosmos.__aenter__()  # connects: may fail
            except BaseException:
                await cosmos.close()  # else its HTTP session is reported unclosed
                raise
            try:
                yield queue, service, cosmos, redis
            finally:
                await cosmos.close()
    finally:
        await redis.aclose()


@contextlib.asynccontextmanager
async def azure_adapter(settings: AzureSettings, runtime_options: Any,
                        calls: Counter[str] | None = None,
                        **adapter_options: Any) -> AsyncIterator[Any]:
    """A ready :class:`~flowcraft.adapters.azure.AzureQueueAdapter` for the settings."""
    async with azure_clients(settings, calls) as (queue, _service, cosmos, redis), \
            azure_payloads(settings, calls) as payloads:
        yield _queue_adapter(settings, runtime_options, queue, cosmos, redis, calls,
                             payloads=payloads, **adapter_options)


@contextlib.asynccontextmanager
async def azure_blob_service(settings: AzureSettings,
                             calls: Counter[str] | None = None) -> AsyncIterator[Any]:
    """An ``azure.storage.blob.aio.BlobServiceClient`` on the storage connection string
    (which must reach Blob Storage: a real account's does; Azurite's names a
    ``BlobEndpoint``); ``calls`` counts its requests as ``blob.METHOD``."""
    try:
        from azure.storage.blob.aio import BlobServiceClient
    except ImportError:
        raise FlowcraftError(
            "the Azure claim check needs the azure extra: pip install 'flowcraft-py[azure]'"
        ) from None
    if not settings.storage_connection_string:
        raise FlowcraftError("the Azure claim check needs AZURE_STORAGE_CONNECTION_STRING (or "
                             "--storage-connection-string)")
    async with BlobServiceClient.from_connection_string(
            settings.storage_connection_string, **_azure_counter(calls, "blob")) as service:
        yield service


@contextlib.asynccontextmanager
async def azure_payloads(settings: AzureSettings,
                         calls: Counter[str] | None = None) -> AsyncIterator[Any]:
    """A :class:`~flowcraft.adapters.azure.payloads.BlobPayloadStore` on the settings'
    payload container, or ``None`` when no container is named."""
    if not settings.payload_container:
        yield None
        return
    from .azure.payloads import BlobPayloadStore

    async with azure_blob_service(settings, calls) as service:
        yield BlobPayloadStore(service, settings.payload_container)


def _queue_adapter(settings: AzureSettings, runtime_options: Any, queue: Any, cosmos: Any,
                   redis: Any, calls: Counter[str] | None, **adapter_options: Any) -> Any:
    from .azure import AzureQueueAdapter, RedisCoordinationStore

    return AzureQueueAdapter(
        runtime_options, RedisCoordinationStore(redis, calls=calls), queue, cosmos,
        cosmos_database_name=settings.database,
        context_container_name=settings.context_container,
        status_container_name=settings.status_container,
        **adapter_options,
    )


def _azure_counter(calls: Counter[str] | None, service: str) -> dict[str, Any]:
    """Client options that count every HTTP request (each retry too) as ``service.METHOD``."""
    if calls is None:
        return {}

    def count(request: Any) -> None:
        calls[f"{service}.{request.http_request.method}"] += 1

    return {"raw_request_hook": count}


async def provision_azure(settings: AzureSettings) -> dict[str, Any]:
    from .azure import AzureNames
    from .azure import provision_azure as provision

    names = AzureNames(settings.queue_name, settings.database, settings.context_container,
                       settings.status_container, settings.payload_container)
    async with azure_clients(settings) as (_queue, service, cosmos, _redis):
        if not names.payload_container:
            return await provision(service, cosmos, names)
        async with azure_blob_service(settings) as blobs:
            return await provision(service, cosmos, names, blobs)


Settings = AwsSettings | AzureSettings


def open_adapter(settings: Settings, runtime_options: Any, calls: Counter[str] | None = None,
                 **adapter_options: Any) -> contextlib.AbstractAsyncContextManager[Any]:
    """:func:`aws_adapter` or :func:`azure_adapter`, as the settings say."""
    if isinstance(settings, AwsSettings):
        return aws_adapter(settings, runtime_options, calls, **adapter_options)
    return azure_adapter(settings, runtime_options, calls, **adapter_options)


@contextlib.asynccontextmanager
async def open_reconciler(settings: Settings, runtime_options: Any,
                          stalled_threshold_seconds: float) -> AsyncIterator[Any]:
    """A :class:`~flowcraft.distributed.reconciler.Reconciler` over the status store the
    settings name (through its index), on an adapter of its own; ``await
    reconciler.run()`` once per pass."""
    if isinstance(settings, AwsSettings):
        from .aws import create_sqs_reconciler

        async with aws_clients(settings) as (sqs, dynamodb), aws_payloads(settings) as payloads:
            adapter = await _sqs_adapter(settings, runtime_options, sqs, dynamodb,
                                         payloads=payloads)
            yield create_sqs_reconciler(adapter, dynamodb, settings.status_table,
                                        stalled_threshold_seconds)
        return
    from .azure import create_azure_reconciler

    async with azure_clients(settings) as (queue, _service, cosmos, redis), \
            azure_payloads(settings) as payloads:
        adapter = _queue_adapter(settings, runtime_options, queue, cosmos, redis, None,
                                 payloads=payloads)
        yield create_azure_reconciler(adapter, cosmos, settings.database,
                                      settings.status_container, stalled_threshold_seconds)


async def provision(settings: Settings) -> dict[str, Any]:
    """Create the queue and tables (AWS) or the queues, database and containers (Azure)
    the settings name, and the claim check's bucket or blob container where one is named,
    where missing; ``created`` lists what was made."""
    if isinstance(settings, AzureSettings):
        return await provision_azure(settings)
    from .aws import AwsNames, provision_aws

    names = AwsNames(settings.queue_name, settings.context_table, settings.status_table,
                     settings.coordination_table, settings.payload_bucket)
    async with aws_clients(settings) as (sqs, dynamodb):
        if not names.payload_bucket:
            return await provision_aws(sqs, dynamodb, names)
        async with aws_s3_client(settings) as s3:
            return await provision_aws(sqs, dynamodb, names, s3)
