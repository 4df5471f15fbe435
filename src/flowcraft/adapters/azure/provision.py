"""``flowcraft provision azure``: the queue, database and containers, idempotently.

Creates (when missing) the storage queue and its ``-poison`` queue, the Cosmos
database, and the context and status containers partitioned on ``/runId``
with time to live enabled (default ttl -1: an item expires only when it has a
``ttl``, which finished runs' items get), also on containers created before.
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


async def provision_azure(queue_service: Any, cosmos_client: Any,
                          names: AzureNames | None = None) -> dict[str, Any]:
    """``queue_service`` is an ``azure.storage.queue.aio.QueueServiceClient``."""
    from azure.core.exceptions import ResourceExistsError
    from azure.cosmos import PartitionKey
    from azure.cosmos.exceptions import CosmosResourceNotFoundError

    names = names or AzureNames()
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
    return {"created": created, "queue": names.queue_name, "database": names.database}
