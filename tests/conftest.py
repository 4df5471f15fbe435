"""Shared fixtures: real local services for the adapter tests.

* ``moto`` — one moto server (SQS + DynamoDB) for the session, in this process.
* ``aws`` — per test: fresh, uniquely named queue and tables on it, provisioned
  like ``flowcraft provision aws``, with aiobotocore clients.
* ``azure_services`` — Azurite, a Cosmos DB server and redis-server for the
  session (child processes on free ports).
* ``azure`` — per test: a fresh queue, Cosmos database and containers.

A missing service binary fails the test run loudly (run ``scripts/setup``);
nothing is skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowcraft.local import AzureServices, MotoEndpoint, azure_services, moto_server


@pytest.fixture(scope="session")
def moto() -> Iterator[MotoEndpoint]:
    with moto_server() as endpoint:
        yield endpoint


@dataclass
class AwsFixture:
    endpoint: MotoEndpoint
    sqs: Any
    dynamodb: Any
    queue_url: str
    queue_name: str
    context_table: str
    status_table: str
    coordination_table: str

    def environment(self) -> dict[str, str]:
        """For subprocesses (CLI, workers, JavaScript clients) using these resources."""
        return {
            **os.environ, **self.endpoint.environment(), "SQS_QUEUE_URL": self.queue_url,
            "FLOWCRAFT_QUEUE_NAME": self.queue_name,
            "FLOWCRAFT_CONTEXT_TABLE": self.context_table,
            "FLOWCRAFT_STATUS_TABLE": self.status_table,
            "FLOWCRAFT_COORDINATION_TABLE": self.coordination_table,
        }


@pytest.fixture
async def aws(moto: MotoEndpoint) -> AsyncIterator[AwsFixture]:
    from aiobotocore.session import get_session

    from flowcraft.adapters.aws import AwsNames, provision_aws

    suffix = uuid.uuid4().hex[:8]
    names = AwsNames(f"jobs-{suffix}", f"contexts-{suffix}", f"statuses-{suffix}",
                     f"coordination-{suffix}")
    session = get_session()
    options = {"region_name": "us-east-1", "endpoint_url": moto.url,
               "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    async with session.create_client("sqs", **options) as sqs, session.create_client(
        "dynamodb", **options
    ) as dynamodb:
        provisioned = await provision_aws(sqs, dynamodb, names)
        yield AwsFixture(moto, sqs, dynamodb, provisioned["queueUrl"], names.queue_name,
                         names.context_table, names.status_table, names.coordination_table)


@pytest.fixture(scope="session")
def azure_services_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureServices]:
    log_dir = Path(tmp_path_factory.mktemp("azure-services"))
    with azure_services(log_dir) as services:
        yield services


@dataclass
class AzureFixture:
    services: AzureServices
    queue: Any
    queue_service: Any
    cosmos: Any
    redis: Any
    queue_name: str
    database: str
    context_container: str
    status_container: str

    def environment(self) -> dict[str, str]:
        return {
            **os.environ, **self.services.endpoints.environment(),
            "FLOWCRAFT_QUEUE_NAME": self.queue_name,
            "FLOWCRAFT_COSMOS_DATABASE": self.database,
            "FLOWCRAFT_CONTEXT_CONTAINER": self.context_container,
            "FLOWCRAFT_STATUS_CONTAINER": self.status_container,
        }


@pytest.fixture
async def azure(azure_services_session: AzureServices) -> AsyncIterator[AzureFixture]:
    from flowcraft.adapters.azure import AzureNames, provision_azure
    from flowcraft.adapters.connect import AzureSettings, azure_clients

    suffix = uuid.uuid4().hex[:8]
    names = AzureNames(f"jobs-{suffix}", f"db-{suffix}", "contexts", "statuses")
    endpoints = azure_services_session.endpoints
    settings = AzureSettings(
        storage_connection_string=endpoints.storage_connection_string,
        cosmos_connection_string=endpoints.cosmos_connection_string,
        redis_url=endpoints.redis_url, queue_name=names.queue_name, database=names.database,
        verify_tls=False,
    )
    async with azure_clients(settings) as (queue, service, cosmos, redis):
        await provision_azure(service, cosmos, names)
        yield AzureFixture(azure_services_session, queue, service, cosmos, redis,
                           names.queue_name, names.database, names.context_container,
                           names.status_container)
