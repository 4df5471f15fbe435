"""``flowcraft provision azure``: the queue, database and containers, idempotently.

Creates (when missing) the storage queue and its ``-poison`` queue, the Cosmos
database, and the context and status containers partitioned on ``/runId``
with time to live enabled (default ttl -1: an item expires only when it has a
``ttl``, which finished runs' items get), also on containers created before. With a
payload container named (the claim check, ``FLOWCRAFT_PAYLOAD_CONTAINER``), also that
blob container, private. Expiring its blobs is a lifecycle management policy of the
storage account, which the storage API used here cannot set: deploy/terraform/azure
declares one (delete 30 days after the last write, the run retention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class AzureNames:
    queue_name: str = "flowcraft-jobs"
    database: str = "flowcraft-db"
    context_container: str = "contexts"
    status_container: str = "statuses"
    payload_container: str | None = None
    """The claim check's blob container; ``None``: none is made."""


async def provision_azure(queue_service: Any, cosmos_client: Any,
                          names: AzureNames | None = None,
                          blob_service: Any = None) -> dict[str, Any]:
    """``queue_service`` is an ``azure.storage.queue.aio.QueueServiceClient``;
    ``blob_service`` an ``azure.storage.blob.aio.BlobServiceClient``, needed when ``names``
    has a payload container."""
    from azure.core.exceptions import ResourceExistsError
    from azure.cosmos import PartitionKey
    from azure.cosmos.exceptions import CosmosResourceNotFoundError

    names = names or AzureNames()
    if names.payload_container and blob_service is None:
        raise ValueError("provision_azure needs a blob service client to create the payload "
                         "container")
    created: list[str] = []
    for queue_name in (names.queue_name, f"{names.queue_name}-poison"):
        try:
            await queue_service.create_queue(queue_name)
            created.append(f"queue {queue_name}")
        except ResourceExistsError:
            pass
    database = cosmos_client.get_database_client(names.database)
    try:
        await database.read()
    except CosmosResourceNotFoundError:
        database = await cosmos_client.create_database_if_not_exists(names.database)
        created.append(f"database {names.database}")
    for container in (names.context_container, names.status_container):
        client = database.get_container_client(container)
        try:
            properties = await client.read()
        except CosmosResourceNotFoundError:
            await database.create_container_if_not_exists(
                container, partition_key=PartitionKey(path="/runId"), default_ttl=-1)
            created.append(f"container {names.database}/{container}")
            continue
        paths = properties.get("partitionKey", {}).get("paths", [])
        if paths != ["/runId"]:
            raise RuntimeError(f"container {container} is partitioned on {paths}; flowcraft "
                               "needs /runId")
        if properties.get("defaultTtl") is None:
            # -1: nothing expires unless an item says so (finished runs carry a ttl).
            await database.replace_container(
                client, partition_key=PartitionKey(path="/runId"), default_ttl=-1)
            created.append(f"ttl {names.database}/{container}")
    if names.payload_container:
        try:
            await blob_service.create_container(names.payload_container)
            created.append(f"blob container {names.payload_container}")
        except ResourceExistsError:
            pass
    return {"created": created, "queue": names.queue_name, "database": names.database}
